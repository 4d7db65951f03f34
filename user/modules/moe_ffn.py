# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The MoE feed-forward block: DeepSpeed's ``MoE`` over fairseq-style experts.

Two ways through a layer, with the same results:

* DeepSpeed's ``MOELayer``: its gate, a ``experts x capacity`` dispatch buffer,
  the all-to-alls and its combine. Always used with expert parallelism
  (``--ep-world-size`` > 1), tensor-parallel experts, ``--moe-use-residual``.
* the *local* path (``fast_dispatch``, on by default when every expert lives in
  this process): DeepSpeed's gate decides the routes (``TopKGate`` with its
  capacity, random token selection and dropping), then each expert runs on
  exactly the tokens it kept, without the buffer's padding slots; DeepSpeed's
  combine (gate value times expert output, summed in fp32) puts them back. In
  inference without token dropping (validation, beam search) top-1 and top-2
  routes are computed directly from the router's fp32 softmax, with DeepSpeed's
  formulas but without the capacity machinery (capacity = busiest expert's count
  drops nothing), so an incremental decoding step costs a dozen small ops.

Turn the local path off with ``FAIRSEQ_MOE_FAST_DISPATCH=0`` (all layers) or
``layer.fast_dispatch = False`` (one layer): tests compare the two.
"""

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules import FairseqDropout
from fairseq.modules.quant_noise import quant_noise
from torch import Tensor, nn

from .. import ds_moe
from ..moe_options import MoEOptions


class ExpertFFN(nn.Module):
    """One expert: the Transformer FFN ``fc2(dropout(act(fc1(x))))``.

    Args:
        embed_dim (int): model dimension.
        ffn_dim (int): hidden dimension (the encoder's or decoder's FFN size).
        activation_fn (str): fairseq activation name (``--activation-fn``).
        activation_dropout (float): dropout after the activation.
        q_noise (float): quant-noise amount, as fairseq's ``build_fc1``.
        qn_block_size (int): quant-noise block size.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ):
        super().__init__()
        self.fc1 = quant_noise(nn.Linear(embed_dim, ffn_dim), q_noise, qn_block_size)
        self.fc2 = quant_noise(nn.Linear(ffn_dim, embed_dim), q_noise, qn_block_size)
        self.activation_fn = utils.get_activation_fn(activation=activation_fn)
        self.activation_dropout_module = FairseqDropout(
            float(activation_dropout), module_name=self.__class__.__name__
        )

    def forward(self, x: Tensor) -> Tensor:
        # ... x C -> ... x C
        x = self.activation_fn(self.fc1(x))
        x = self.activation_dropout_module(x)
        return self.fc2(x)

    def compute(self, x: Tensor) -> Tensor:
        """:meth:`forward` without the module-call machinery, for :meth:`plain` experts.

        The local dispatch calls every expert once per MoE layer and decoding step;
        four module calls per expert cost more than its matrix products on small batches.
        """
        fc1, fc2, dropout = self.fc1, self.fc2, self.activation_dropout_module
        x = self.activation_fn(F.linear(x, fc1.weight, fc1.bias))
        if dropout.p > 0 and (self.training or dropout.apply_during_inference):
            x = dropout(x)
        return F.linear(x, fc2.weight, fc2.bias)

    def plain(self) -> bool:
        """No hook on the expert or its linears (quant-noise, user hooks): then
        :meth:`compute` equals calling the module."""
        if type(self.fc1) is not nn.Linear or type(self.fc2) is not nn.Linear:
            return False
        for m in (self, self.fc1, self.fc2):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        return not _global_module_hooks()


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _m

    return any(getattr(_m, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


#: Default of :attr:`MoEFeedForward.fast_dispatch` (``FAIRSEQ_MOE_FAST_DISPATCH=0`` turns it off).
FAST_DISPATCH = _env_flag("FAIRSEQ_MOE_FAST_DISPATCH", True)

#: Default of :attr:`MoEFeedForward.exact_fit` (``FAIRSEQ_MOE_EXACT_FIT=0`` turns it off).
#: Expert parallelism without token dropping (validation and generation by default,
#: training with ``--no-moe-drop-tokens``), top-1/top-2: every rank's all-to-all
#: buffers need one size. On: the group's busiest expert count, agreed with one
#: small all-reduce per MoE layer. Off: room for all of the group's largest token
#: count in every expert (no per-layer collective, but the experts compute and the
#: all-to-alls carry ``num_experts`` times the tokens). On pays off with many tokens
#: (validation: 0.38-0.41x -> 0.58-0.63x dense on 2 CPU processes); an incremental decoding
#: step of a few hundred tokens gains nothing from it, so it applies from
#: :attr:`MoEFeedForward.exact_fit_min_tokens` tokens on.
EXACT_FIT = _env_flag("FAIRSEQ_MOE_EXACT_FIT", True)


class MoEFeedForward(nn.Module):
    """A DeepSpeed MoE layer in place of a Transformer FFN block.

    After each forward, ``l_aux`` holds the layer's gate (load-balancing) loss
    and ``exp_counts`` the number of tokens routed to each expert (``E``).
    Across expert-parallel ranks, set ``agreed_tokens`` to the largest token
    count of the group (the model does, once per forward): every rank then
    sizes its dispatch buffers for that count, so the all-to-all shapes match.

    Args:
        embed_dim (int): model dimension.
        expert (ExpertFFN): the expert to replicate.
        opts (MoEOptions): MoE options.
        layer_key (str): unique layer name (seeds the experts).
        seed (int): the run's seed.
    """

    #: Local dispatch (see the module docstring); ``None`` = :data:`FAST_DISPATCH`.
    fast_dispatch: Optional[bool] = None
    #: Expert-parallel buffers without dropping; ``None`` = :data:`EXACT_FIT`.
    exact_fit: Optional[bool] = None
    #: ... for forwards of at least this many tokens (the group's largest count).
    exact_fit_min_tokens: int = 1024

    def __init__(self, embed_dim: int, expert: nn.Module, opts: MoEOptions, layer_key: str, seed: int):
        super().__init__()
        self.opts = opts
        self.moe = ds_moe.build_moe(embed_dim, expert, opts, layer_key, seed)
        self.l_aux: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.agreed_tokens: Optional[int] = None
        # routing statistics of the last forward (the model turns this on in
        # training and validation, not in incremental decoding)
        self.collect_stats = False
        self.stats: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        # Inference drops no token unless asked: a dropped token silently
        # degrades a translation.
        gate = ds_moe.moe_gate(self.moe)
        gate.drop_tokens = self.opts.drop_tokens if mode else self.opts.eval_drop_tokens
        # DeepSpeed samples top-2's second expert in eval too: keep inference deterministic.
        gate.top2_2nd_expert_sampling = self.opts.top2_2nd_expert_sampling and mode
        return self

    def uses_exact_fit(self) -> bool:
        """Whether an expert-parallel forward without token dropping sizes its buffers
        for the group's busiest expert (see :data:`EXACT_FIT`). Every rank decides
        alike: the decision depends only on the agreed token count."""
        on = EXACT_FIT if self.exact_fit is None else self.exact_fit
        return (bool(on) and self.opts.top_k <= 2 and self.agreed_tokens is not None
                and self.agreed_tokens >= self.exact_fit_min_tokens)

    def _router_logits(self, tokens: Tensor) -> Tensor:
        """``S x E`` router logits in fp32, as DeepSpeed's gate computes them (no noise)."""
        return F.linear(tokens.float(), ds_moe.moe_gate(self.moe).wg.weight.float())

    @torch.no_grad()
    def _busiest_expert_in_group(self, logits: Tensor) -> int:
        """Most routes any expert gets on any rank of the expert-parallel group.

        The routes are DeepSpeed's (same fp32 router ``logits``, same argmax):
        computed here once more to size the buffers before DeepSpeed's gate runs.
        One all-reduce.
        """
        counts = no_drop_routes(logits, self.opts.top_k)[3]
        busiest = int(counts.max()) if counts.numel() else 0
        return max(ds_moe.agree_on_token_counts([busiest], self.opts.ep_size)[0], 1)

    def uses_local_dispatch(self) -> bool:
        """Whether the next forward takes the local path (see the module docstring)."""
        on = FAST_DISPATCH if self.fast_dispatch is None else self.fast_dispatch
        return bool(on) and self.agreed_tokens is None and ds_moe.local_dispatch_supported(self.moe)

    # -- routing statistics ---------------------------------------------------------

    @torch.no_grad()
    def _routing_stats(self, tokens: Tensor, padding_mask: Optional[Tensor],
                       logits: Optional[Tensor] = None) -> dict:
        """Gate entropy over the real (non-padding) tokens, from the router's fp32 softmax.

        ``tokens`` is ``T*B x C`` in ``T``-major order; ``logits`` (``>= T*B x E``), when
        the forward already has the router's un-noised fp32 logits, are reused.
        """
        n = tokens.size(0)
        if logits is None:
            logits = self._router_logits(tokens)
        logp = torch.log_softmax(logits[:n], dim=-1)
        ent = -(logp.exp() * logp).sum(-1)  # n
        if padding_mask is not None:
            real = ~padding_mask.t().reshape(-1)
            return {"tokens": float(real.sum()), "entropy": float(ent[real].sum())}
        return {"tokens": float(n), "entropy": float(ent.sum())}

    @torch.no_grad()
    def _load_stats(self, n: int, drop: bool) -> dict:
        """Tokens per expert and tokens over capacity (dropped) in the last forward.

        DeepSpeed fills each expert's ``capacity`` slots in order and drops the
        rest, so an expert that was sent ``c`` tokens drops ``max(c - capacity, 0)``.
        """
        counts = self.exp_counts.detach().float().cpu()
        if drop:
            cap = ds_moe.dispatch_capacity(
                self.agreed_tokens if self.agreed_tokens is not None else n, self.opts, self.training)
            dropped = float((counts - cap).clamp_min(0).sum())
        else:
            dropped = 0.0
        return {"counts": counts, "dropped": dropped, "routed": float(counts.sum()),
                "aux": float(self.l_aux.detach()) if self.l_aux is not None else 0.0}

    # -- forward ----------------------------------------------------------------------

    def _gate_inputs(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """``(routed, used)``: the tokens DeepSpeed's gate sees and their mask.

        ``used`` (``T*B``, 1 for real tokens, ``tokens``' order) is given when padding
        could take expert capacity, top-1 or top-2 with token dropping: padding then
        gets no route. DeepSpeed's top-1 gate asserts tokens >= min_capacity (e.g. one
        greedy step): ``routed`` then has zero rows appended (unused).
        """
        used = None
        if padding_mask is not None and self.opts.top_k <= 2 and ds_moe.moe_gate(self.moe).drop_tokens:
            used = (~padding_mask).t().reshape(-1).to(tokens.dtype)  # B x T -> T*B
        short = self.opts.min_capacity - tokens.size(0) if self.opts.top_k == 1 else 0
        if short <= 0:
            return tokens, used
        routed = torch.cat([tokens, tokens.new_zeros(short, tokens.size(1))])
        if used is not None:
            used = torch.cat([used, used.new_zeros(short)])
        return routed, used

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x (Tensor): ``T x B x C``.
            padding_mask (Tensor, optional): ``B x T``, True at padding; padding
                tokens then take no expert capacity (top-1 and top-2 with token
                dropping) and their output is zero.

        Returns:
            Tensor of shape ``T x B x C``.
        """
        T, B, C = x.shape
        tokens = x.reshape(T * B, C)
        gate = ds_moe.moe_gate(self.moe)
        drop = gate.drop_tokens
        if self.uses_local_dispatch():
            if not self.training and not drop and self.opts.top_k <= 2:
                out = self._forward_no_drop(tokens, padding_mask)
            else:
                out = self._forward_local(tokens, padding_mask)
            if self.collect_stats:
                self.stats.update(self._load_stats(tokens.size(0), drop))
            return out[: T * B].view(T, B, C)

        routed, used = self._gate_inputs(tokens, padding_mask)
        logits = None  # the router's, when computed here
        if self.agreed_tokens is not None:
            # Size the buffers alike on every rank, without padding (padding would
            # shift the gate loss): see ds_moe.capacity_factor_for. Dropping: the
            # capacity of the group's largest token count. Without dropping: the
            # group's busiest expert (exact fit, one all-reduce here) or room for all
            # of the largest rank's tokens in every expert; never DeepSpeed's no-drop
            # path, whose capacity is capped by each rank's own token count (shapes
            # would differ between ranks with uneven batches).
            if drop:
                want = ds_moe.dispatch_capacity(self.agreed_tokens, self.opts, self.training)
            elif self.uses_exact_fit():
                with torch.no_grad():  # sizes only; DeepSpeed's gate makes the routes
                    logits = self._router_logits(routed)
                want = self._busiest_expert_in_group(logits)
            else:
                want = self.agreed_tokens
            gate.capacity_factor = gate.eval_capacity_factor = ds_moe.capacity_factor_for(
                want, routed.size(0), self.opts
            )
            gate.drop_tokens = True
        if self.collect_stats:
            self.stats = self._routing_stats(tokens, padding_mask, logits)
        try:
            with ds_moe.padding_takes_no_capacity(self.moe, used):
                out, self.l_aux, self.exp_counts = self.moe(routed, used)
            if self.collect_stats:
                self.stats.update(self._load_stats(routed.size(0), drop))
        finally:
            gate.drop_tokens = drop
            gate.capacity_factor = self.opts.capacity_factor
            gate.eval_capacity_factor = self.opts.eval_capacity_factor
        return out[: T * B].view(T, B, C)

    def _forward_local(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """DeepSpeed's gate (capacity, random token selection, dropping), then each
        expert on exactly its kept tokens."""
        n = tokens.size(0)
        gate = ds_moe.moe_gate(self.moe)
        routed, used = self._gate_inputs(tokens, padding_mask)
        if self.collect_stats:
            self.stats = self._routing_stats(tokens, padding_mask)
        with ds_moe.padding_takes_no_capacity(self.moe, used):
            l_aux, cap, E, indices, locations, gates, exp_counts = gate(routed, used, True)
        self._set_gate_outputs(l_aux, exp_counts)
        # Kept routes in DeepSpeed's buffer order (expert, then slot); dropped ones
        # (negative expert index) sort last and are cut off.
        flat = indices.reshape(-1).long()
        cap = int(cap)
        key = torch.where(flat >= 0, flat * cap + locations.reshape(-1).long(), E * cap)
        counts = torch.bincount(flat + 1, minlength=E + 1)[1:]
        sizes = counts.tolist()
        order = torch.argsort(key)[: sum(sizes)]
        return self._run_experts(routed, order, sizes, gates)[:n]

    def _forward_no_drop(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """Inference without dropping, top-1 or top-2: DeepSpeed's routing formulas
        straight from the router's softmax (no capacity: nothing is dropped)."""
        logits = self._router_logits(tokens)
        if self.collect_stats:
            self.stats = self._routing_stats(tokens, padding_mask, logits)
        indices, gates, l_aux, exp_counts = no_drop_routes(logits, self.opts.top_k)
        self._set_gate_outputs(l_aux, exp_counts)
        if self.opts.top_k == 1:
            # tokens grouped by expert, in token order (DeepSpeed's slot order)
            order = torch.argsort(indices[0], stable=True)
            return self._run_experts(tokens, order, exp_counts.tolist(), gates, complete=True)
        flat = indices.reshape(-1)
        # by expert, then 1st choices in token order, then 2nd choices (DeepSpeed's order)
        order = torch.argsort(flat, stable=True)
        sizes = torch.bincount(flat, minlength=logits.size(1)).tolist()
        return self._run_experts(tokens, order, sizes, gates)

    def _set_gate_outputs(self, l_aux: Tensor, exp_counts: Tensor) -> None:
        self.l_aux, self.exp_counts = l_aux, exp_counts
        # as after DeepSpeed's MOELayer.forward
        self.moe.deepspeed_moe.l_aux, self.moe.deepspeed_moe.exp_counts = l_aux, exp_counts

    def _run_experts(self, tokens: Tensor, order: Tensor, sizes: List[int], gates: Tensor,
                     complete: bool = False) -> Tensor:
        """Run expert ``e`` on the next ``sizes[e]`` routes of ``order`` and combine.

        ``order`` holds route ids ``r = j * n + s`` (choice ``j`` of token ``s``) grouped by
        expert; ``gates`` is ``k x n`` (fp32); ``complete``: every token has a route (top-1
        without dropping). The combine is DeepSpeed's (``sharded_moe._sparse_decode``): gate
        value times expert output in fp32, summed over the token's routes, cast back; a
        dropped route contributes zero.
        """
        n, C = tokens.shape
        k = gates.size(0)
        x = tokens.index_select(0, order % n if k > 1 else order)
        outs = []
        start = 0
        # an expert with no token still runs (on zero rows): its parameters then get
        # zero gradients, as in DeepSpeed's buffer, rather than none
        experts = ds_moe.local_experts(self.moe)
        plain = all(isinstance(e, ExpertFFN) for e in experts) and all(e.plain() for e in experts)
        for expert, size in zip(experts, sizes):
            chunk = x[start : start + size]
            out = expert.compute(chunk) if plain else expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
            start += size
        y = torch.cat(outs) if len(outs) > 1 else outs[0]
        if k == 1:
            # back in token order (a dropped token's row stays zero), times the gate
            # value (zero for a dropped token), in fp32
            placed = (torch.empty_like(y, memory_format=torch.contiguous_format) if complete
                      else y.new_zeros(n, C)).index_copy(0, order, y)
            return (placed * gates[0].unsqueeze(1)).to(y.dtype)
        position = torch.full((k * n,), y.size(0), dtype=torch.long, device=y.device)
        position[order] = torch.arange(y.size(0), device=y.device)
        padded = torch.cat([y, y.new_zeros(1, C)])
        routed = padded.index_select(0, position).view(k, n, C)
        return (routed * gates.unsqueeze(-1)).sum(0).to(y.dtype)


def no_drop_routes(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeepSpeed's top-1/top-2 routes without token dropping, for inference.

    The same formulas as ``deepspeed.moe.sharded_moe.top1gating``/``top2gating``
    (fp32 softmax, argmax of the gate probabilities, for top-2 the second expert as
    the argmax of the other logits and both weights normalised, ``l_aux`` and the
    counts), without what only matters when tokens can be dropped: with capacity
    = the busiest expert's count every route is kept. Bit-identical to DeepSpeed's
    values (a one-hot mean is the count over S, a masked sum the gathered value).

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        k (int): 1 or 2 (no noise, no sampling: inference).

    Returns:
        ``(indices k x S, gates k x S, l_aux, exp_counts E)``.
    """
    S, num_experts = logits.shape
    gates = torch.softmax(logits, dim=1)
    g1, idx1 = torch.max(gates, dim=1)  # the first maximum, as argmax
    me = torch.mean(gates, dim=0)
    if k == 1:
        counts = torch.bincount(idx1, minlength=num_experts)
        l_aux = torch.sum(me * (counts.float() / S)) * num_experts
        return idx1.unsqueeze(0), g1.unsqueeze(0), l_aux, counts
    if k != 2:
        raise ValueError(f"no_drop_routes handles top-1 and top-2, not top-{k}")
    mask1 = F.one_hot(idx1, num_classes=num_experts)
    idx2 = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(idx2, num_classes=num_experts)
    l_aux = torch.mean(me * torch.mean(mask1.float(), dim=0)) * num_experts * num_experts
    g2 = gates.gather(1, idx2.unsqueeze(1)).squeeze(1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    return (torch.stack([idx1, idx2]), torch.stack([g1 / denom, g2 / denom]), l_aux,
            torch.sum(mask1 + mask2, dim=0))
