# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The MoE feed-forward block: DeepSpeed's ``MoE`` over fairseq-style experts.

The gate (:class:`~user.modules.gating.Gate`) routes the tokens within the capacity
this block gives it: when tokens are dropped, DeepSpeed's capacity for the token
count (with expert parallelism, the group's largest count); otherwise the busiest
expert's count (with expert parallelism on the buffer path, the group's busiest, or
room for all of the group's largest token count, see :data:`EXACT_FIT`). The tokens
then take one of three ways, with the same results:

* through DeepSpeed's buffers: its ``experts x capacity`` dispatch buffer
  (``sharded_moe._sparse_encode``), the all-to-alls over the expert-parallel
  group, the experts and its combine (``_sparse_decode``), then the residual MLP of
  ``--moe-use-residual`` as in DeepSpeed's ``MoE.forward``. Always used with
  ``--moe-use-residual``, and with expert parallelism (``--ep-world-size`` > 1) when
  tokens are dropped (training by default).
* the *local* path (``fast_dispatch``, on by default when every expert lives in
  this process): each expert runs on exactly the tokens it kept, without the
  buffer's padding slots; DeepSpeed's combine (gate value times expert output,
  summed in fp32) puts them back. In inference without token dropping
  (validation, beam search) top-1 and top-2 routes come from
  :func:`~user.modules.gating.no_drop_routes` (DeepSpeed's formulas without the
  capacity machinery), so an incremental decoding step costs a dozen small ops.
* the *exchange* (``fast_dispatch``, on by default with expert parallelism when no
  token is dropped: validation, beam search, ``--no-moe-drop-tokens``): the local
  path across the expert-parallel group. A small all-to-all of per-expert route
  counts, then variable-size all-to-alls (``all_to_all_single`` with split sizes)
  carry exactly the routes to the experts' ranks and their outputs back: no buffer
  padded to the busiest expert, and no all-reduce to agree on its size. A decoding
  step sends the counts with the routes, in one all-to-all.

Turn the local path and the exchange off with ``FAIRSEQ_MOE_FAST_DISPATCH=0`` (all
layers) or ``layer.fast_dispatch = False`` (one layer): tests compare the paths.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from deepspeed.utils import groups
from fairseq import utils
from fairseq.modules import FairseqDropout
from fairseq.modules.quant_noise import quant_noise
from torch import Tensor, nn

from .. import ds_moe
from ..errors import env_flag
from ..moe_options import MoEOptions
from . import gating
from .gating import Routes


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
            if (
                m._forward_hooks
                or m._forward_pre_hooks
                or m._backward_hooks
                or m._backward_pre_hooks
            ):
                return False
        return not _global_module_hooks()


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _m

    return any(
        getattr(_m, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
            "_global_forward_hooks_always_called",
        )
    )


#: Default of :attr:`MoEFeedForward.fast_dispatch` (``FAIRSEQ_MOE_FAST_DISPATCH=0`` turns it off).
FAST_DISPATCH = env_flag("FAIRSEQ_MOE_FAST_DISPATCH", True)

#: Default of :attr:`MoEFeedForward.exact_fit` (``FAIRSEQ_MOE_EXACT_FIT=0`` turns it off).
#: Expert parallelism without token dropping (validation and generation by default,
#: training with ``--no-moe-drop-tokens``) on the buffer path (the exchange, the
#: default, sizes nothing): every rank's all-to-all buffers need one size. On: the
#: group's busiest expert count (from the gate's routes), agreed with one small
#: all-reduce per MoE layer. Off: room for all of the group's largest token count in
#: every expert (no per-layer collective, but the experts compute and the all-to-alls
#: carry ``num_experts`` times the tokens). On pays off with many tokens (validation:
#: 0.38-0.41x -> 0.58-0.63x dense on 2 CPU processes); an incremental decoding step of
#: a few hundred tokens gains nothing from it, so it applies from
#: :attr:`MoEFeedForward.exact_fit_min_tokens` tokens on.
EXACT_FIT = env_flag("FAIRSEQ_MOE_EXACT_FIT", True)


def real_tokens(padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``T*B`` (``T``-major, as the layer's tokens), True at real tokens, from a ``B x T``
    padding mask; None without one."""
    return None if padding_mask is None else (~padding_mask).t().reshape(-1)


class MoEFeedForward(nn.Module):
    """A DeepSpeed MoE layer in place of a Transformer FFN block.

    After each forward, ``l_aux`` holds the layer's gate (load-balancing) loss,
    ``z_loss`` its router z-loss (with ``--moe-z-loss``, else None)
    and ``exp_counts`` the number of tokens routed to each expert (``E``).
    Across expert-parallel ranks, set ``agreed_tokens`` to the largest token
    count of the group (the model does, once per forward): every rank then takes
    the same path (the exchange or the buffers) and sizes what it sends for that
    count (the buffers, or the exchange's block that carries the counts with the
    rows), so the all-to-all shapes match.

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
    #: The exchange without autograd sends the route counts with the rows (one all-to-all
    #: fewer, see :meth:`_send_with_counts`) while its send block's rows, sized for the
    #: group's largest token count, are at most this many bytes (decoding steps and
    #: small validation batches; large ones send the counts first).
    fused_send_max_bytes: int = 1 << 20

    def __init__(
        self, embed_dim: int, expert: nn.Module, opts: MoEOptions, layer_key: str, seed: int
    ):
        super().__init__()
        self.opts = opts
        self.moe = ds_moe.build_moe(embed_dim, expert, opts, layer_key, seed)
        self.l_aux: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.agreed_tokens: Optional[int] = None
        # the path of the last forward (benchmarks and tests): "local", "exchange", or
        # DeepSpeed's buffers with room per expert for "capacity" (tokens over it
        # dropped), "busiest" (this rank's busiest expert), "agreed" (the group's
        # busiest, exact fit) or "room" (all of the group's largest token count)
        self.path: Optional[str] = None
        # routing statistics of the last forward (the model turns this on in
        # training and validation, not in incremental decoding)
        self.collect_stats = False
        self.stats: dict = {}

    def uses_exact_fit(self) -> bool:
        """Whether an expert-parallel forward without token dropping sizes its buffers
        for the group's busiest expert (see :data:`EXACT_FIT`). Every rank decides
        alike: the decision depends only on the agreed token count."""
        on = EXACT_FIT if self.exact_fit is None else self.exact_fit
        return (
            bool(on)
            and self.agreed_tokens is not None
            and self.agreed_tokens >= self.exact_fit_min_tokens
        )

    def _fast(self) -> bool:
        """:attr:`fast_dispatch`, or its default :data:`FAST_DISPATCH`."""
        return bool(FAST_DISPATCH if self.fast_dispatch is None else self.fast_dispatch)

    def uses_local_dispatch(self) -> bool:
        """Whether the next forward takes the local path (see the module docstring)."""
        return (
            self._fast()
            and self.agreed_tokens is None
            and ds_moe.local_dispatch_supported(self.moe)
        )

    def uses_exchange(self) -> bool:
        """Whether the next forward takes the exchange (see the module docstring): expert
        parallelism (the group's token count agreed), no token dropped. Every rank of the
        group decides alike (the same flags, mode and layer)."""
        return (
            self._fast()
            and self.agreed_tokens is not None
            and ds_moe.exchange_supported(self.moe)
            and not ds_moe.moe_gate(self.moe).drops()
        )

    # -- routing ----------------------------------------------------------------------

    def _route(
        self, tokens: Tensor, padding_mask: Optional[Tensor], local: bool
    ) -> Tuple[Routes, Optional[Tensor]]:
        """The gate's routes of ``tokens`` (``T*B x C``, ``T``-major) within the capacity
        this forward needs, and the router's un-noised fp32 logits when computed here.
        ``local``: each expert gets exactly its routes (the local path or the exchange),
        so no buffer size is agreed."""
        gate = ds_moe.moe_gate(self.moe)
        if gate.drops():
            # DeepSpeed's capacity for the token count; with expert parallelism the
            # group's largest count, so that every rank's buffers have one size
            n = tokens.size(0) if self.agreed_tokens is None else self.agreed_tokens
            self.path = "capacity"
            return gate(tokens, real_tokens(padding_mask), capacity=gate.capacity(n)), None
        if local and not self.training and gate.policy in gating.NO_DROP_POLICIES:
            logits = gate.router_logits(tokens)
            return gating.no_drop_routes(logits, gate.k, gate.expert_bias), logits
        routes = gate(tokens)  # capacity: the busiest expert's count, nothing dropped
        if self.agreed_tokens is None or local:
            self.path = "busiest"
            return routes, None
        # Expert parallelism: one buffer size on every rank of the group (never the
        # rank's own busiest count: ranks with uneven batches would disagree), at least
        # min_capacity as DeepSpeed's: the group's busiest expert (exact fit, one small
        # all-reduce) or room for all of the largest rank's tokens in every expert.
        if self.uses_exact_fit():
            cap, self.path = self._busiest_in_group(routes.capacity), "agreed"
        else:
            cap, self.path = self.agreed_tokens, "room"
        return routes._replace(capacity=max(cap, gate.min_capacity)), None

    def _busiest_in_group(self, busiest: int) -> int:
        """Most routes any expert gets on any rank of the expert-parallel group (at
        least 1), from this rank's busiest count. One all-reduce."""
        return max(ds_moe.agree_on_token_counts([busiest], self.opts.ep_size)[0], 1)

    @staticmethod
    def _real_load(routes: Routes, padding_mask: Optional[Tensor], gate) -> Tensor:
        """Routes per expert (``E``) of the real tokens, over capacity or not. Dropping
        gates leave padding out of ``routes.counts``; the others route it too."""
        if gate.drops() or padding_mask is None:
            return routes.counts
        chosen = routes.indices.long()[:, real_tokens(padding_mask)].reshape(-1)
        return torch.bincount(chosen[chosen >= 0], minlength=gate.num_experts)

    # -- routing statistics ---------------------------------------------------------

    @torch.no_grad()
    def _routing_stats(
        self, tokens: Tensor, padding_mask: Optional[Tensor], logits: Optional[Tensor] = None
    ) -> dict:
        """Gate entropy over the real (non-padding) tokens, from the router's fp32 softmax.

        ``tokens`` is ``T*B x C`` in ``T``-major order; ``logits`` (``T*B x E``), when
        the forward already has the router's un-noised fp32 logits, are reused.
        """
        if logits is None:
            logits = ds_moe.moe_gate(self.moe).router_logits(tokens)
        logp = torch.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp).sum(-1)  # T*B
        if padding_mask is not None:
            real = real_tokens(padding_mask)
            return {"tokens": float(real.sum()), "entropy": float(ent[real].sum())}
        return {"tokens": float(tokens.size(0)), "entropy": float(ent.sum())}

    @torch.no_grad()
    def _load_stats(self, routes: Routes) -> dict:
        """Tokens per expert and tokens over capacity (dropped) in the last forward.

        An expert keeps at most ``routes.capacity`` of its routes (the capacity the
        gate used), so an expert that was sent ``c`` routes drops ``max(c - capacity, 0)``.
        """
        counts = routes.counts.detach().float().cpu()
        dropped = float((counts - routes.capacity).clamp_min(0).sum())
        return {
            "counts": counts,
            "dropped": dropped,
            "routed": float(counts.sum()),
            "aux": float(routes.l_aux.detach()),
        }

    # -- forward ----------------------------------------------------------------------

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x (Tensor): ``T x B x C``.
            padding_mask (Tensor, optional): ``B x T``, True at padding; when tokens
                are dropped, padding takes no route and no expert capacity (its
                output is then zero).

        Returns:
            Tensor of shape ``T x B x C``.
        """
        T, B, C = x.shape
        tokens = x.reshape(T * B, C)
        local = self.uses_local_dispatch()
        exchange = not local and self.uses_exchange()
        # DeepSpeed's MoE.forward routes a view of its input (MOELayer's reshape) and runs
        # the residual MLP on the input itself: so do the buffers, and the input's
        # gradient sums its parts in DeepSpeed's order, bit for bit
        routed = tokens if local or exchange else tokens.reshape(-1, C)
        routes, logits = self._route(routed, padding_mask, local or exchange)
        if local or exchange:  # (the buffers': set by _route)
            self.path = "local" if local else "exchange"
        self.l_aux, self.exp_counts = routes.l_aux, routes.counts
        gate = ds_moe.moe_gate(self.moe)
        if gate.load is not None and self.training:  # --moe-bias-balance counts training
            gate.count_load(self._real_load(routes, padding_mask, gate))
        # as after DeepSpeed's MOELayer.forward
        layer = self.moe.deepspeed_moe
        layer.l_aux, layer.exp_counts = routes.l_aux, routes.counts
        self.z_loss = None
        if self.opts.z_loss and (self.training or self.collect_stats):  # (not decoding)
            if logits is None:  # the router's un-noised logits, with their gradient
                logits = ds_moe.moe_gate(self.moe).router_logits(tokens)
            self.z_loss = gating.router_z_loss(logits, real_tokens(padding_mask))
        if self.collect_stats:
            self.stats = self._routing_stats(tokens, padding_mask, logits)
            if self.z_loss is not None:
                self.stats["z"] = float(self.z_loss.detach())
            if gate.expert_bias is not None:  # its spread: how far balancing has moved
                self.stats["bias"] = float(gate.expert_bias.max() - gate.expert_bias.min())
        if self.training and self.opts.eom > 0:
            routes = routes._replace(gates=self._mask_expert_outputs(routes.gates))
        if local or exchange:
            out = self._forward_local(tokens, routes, exchange)
        else:
            out = self._forward_buffers(routed, tokens, routes)
        if self.collect_stats:
            self.stats.update(self._load_stats(routes))
        return out.view(T, B, C)

    def _mask_expert_outputs(self, gates: Tensor) -> Tensor:
        """Expert output masking (NLLB-200's ``--moe-eom``): each route's expert output
        is dropped with probability ``p`` (its weight in the combine set to 0, on every
        dispatch path alike), the kept ones scaled by ``1 / (1 - p)`` so that evaluation
        runs the layer unchanged. ``gates``: ``k x S`` fp32."""
        p = self.opts.eom
        keep = torch.rand_like(gates) >= p  # k x S
        return gates * keep / (1 - p)

    def _forward_buffers(self, routed: Tensor, tokens: Tensor, routes: Routes) -> Tensor:
        """DeepSpeed's dispatch (``MOELayer.forward`` after its gate) of ``routed`` and
        ``MoE.forward``'s residual mix with ``tokens`` (the same ``S x C`` values), for
        the given routes: ``S x C`` -> ``S x C``."""
        moe, layer = self.moe, self.moe.deepspeed_moe
        if layer.use_tutel or groups.mpu is not None:
            raise NotImplementedError(
                "MoEFeedForward supports neither Tutel nor tensor-parallel experts"
            )
        S, M = routed.shape
        E, cap = self.opts.num_experts, routes.capacity
        slots = sharded_moe._route_slots(routes.indices, routes.locations, E, cap)  # k x S
        dispatched = self._all_to_all(sharded_moe._sparse_encode(routed, slots, E, cap))  # ecm
        # ecm -> gecm: this rank's experts, the slots of every rank of the group
        expert_out = layer.experts(dispatched.reshape(moe.ep_size, layer.num_local_experts, -1, M))
        expert_out = self._all_to_all(expert_out.reshape(E, -1, M))  # gecm -> ecm
        out = sharded_moe._sparse_decode(expert_out.view(E * cap, M), slots, routes.gates, S)
        if moe.use_residual:
            # PR-MoE: a dense MLP beside the experts, mixed per token by a learned softmax
            mlp = moe.mlp(tokens)
            if isinstance(mlp, tuple):
                mlp = mlp[0]
            coef = F.softmax(moe.coefficient(tokens), dim=-1)  # S x 2
            out = out * coef[..., 0:1] + mlp * coef[..., 1:]
        return out

    def _all_to_all(self, x: Tensor) -> Tensor:
        """DeepSpeed's all-to-all over the layer's expert-parallel group (none at EP=1)."""
        if self.moe.ep_size > 1:
            return sharded_moe._AllToAll.apply(self.moe.deepspeed_moe.ep_group, x)
        return x.contiguous()

    def _forward_local(self, tokens: Tensor, routes: Routes, exchange: bool = False) -> Tensor:
        """Each expert on exactly its kept routes, in DeepSpeed's slot order:
        ``S x C`` -> ``S x C``. ``exchange``: the experts are spread over the
        expert-parallel group (:meth:`_exchange`)."""
        E = self.opts.num_experts
        flat = routes.indices.reshape(-1).long()  # k*S, choice-major
        if routes.locations is None:
            # every route kept, each expert's slots in (choice, token) order
            order = torch.argsort(flat, stable=True)
            return self._run_experts(
                tokens,
                order,
                routes.counts.tolist(),
                routes.gates,
                complete=routes.gates.size(0) == 1,
                exchange=exchange,
            )
        # kept routes by expert, then slot; dropped ones (expert -1) sort last and are cut off
        cap = routes.capacity
        key = torch.where(flat >= 0, flat * cap + routes.locations.reshape(-1).long(), E * cap)
        sizes = torch.bincount(flat + 1, minlength=E + 1)[1:].tolist()
        order = torch.argsort(key)[: sum(sizes)]
        return self._run_experts(tokens, order, sizes, routes.gates, exchange=exchange)

    def _run_experts(
        self,
        tokens: Tensor,
        order: Tensor,
        sizes: List[int],
        gates: Tensor,
        complete: bool = False,
        exchange: bool = False,
    ) -> Tensor:
        """Run expert ``e`` on the next ``sizes[e]`` routes of ``order`` and combine.
        ``exchange``: expert ``e`` may live on another rank (:meth:`_exchange`).

        ``order`` holds route ids ``r = j * n + s`` (choice ``j`` of token ``s``) grouped by
        expert; ``gates`` is ``k x n`` (fp32); ``complete``: every token has a route (top-1
        without dropping). The combine is DeepSpeed's (``sharded_moe._sparse_decode``): gate
        value times expert output in fp32, summed over the token's routes, cast back; a
        dropped route contributes zero.
        """
        n, C = tokens.shape
        k = gates.size(0)
        x = tokens.index_select(0, order % n if k > 1 else order)
        if exchange:
            y = self._exchange(x, sizes, most=self.agreed_tokens * k)
        else:
            outs = self._experts(list(x.split(sizes)))
            y = torch.cat(outs) if len(outs) > 1 else outs[0]
        if k == 1:
            # back in token order (a dropped token's row stays zero), times the gate
            # value (zero for a dropped token), in fp32
            placed = (
                torch.empty_like(y, memory_format=torch.contiguous_format)
                if complete
                else y.new_zeros(n, C)
            ).index_copy(0, order, y)
            return (placed * gates[0].unsqueeze(1)).to(y.dtype)
        position = torch.full((k * n,), y.size(0), dtype=torch.long, device=y.device)
        position[order] = torch.arange(y.size(0), device=y.device)
        padded = torch.cat([y, y.new_zeros(1, C)])
        routed = padded.index_select(0, position).view(k, n, C)
        return (routed * gates.unsqueeze(-1)).sum(0).to(y.dtype)

    def _experts(self, chunks: List[Tensor]) -> List[Tensor]:
        """This process's expert ``l`` on ``chunks[l]`` (``N_l x C`` each)."""
        # an expert with no token still runs (on zero rows): its parameters then get
        # zero gradients, as in DeepSpeed's buffer, rather than none
        experts = ds_moe.local_experts(self.moe)
        plain = all(isinstance(e, ExpertFFN) for e in experts) and all(e.plain() for e in experts)
        outs = []
        for expert, chunk in zip(experts, chunks):
            out = expert.compute(chunk) if plain else expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def _exchange(self, x: Tensor, sizes: List[int], most: int) -> Tensor:
        """The experts' outputs for this rank's routes across the expert-parallel group,
        without padding: ``x`` holds ``sizes[e]`` rows for expert ``e`` of all ``E``, in
        expert order, and so does the result (``N x C`` -> ``N x C``). ``most``: the
        most rows any rank of the group has (the agreed token count times ``k``).

        Rank ``g`` holds experts ``g * L ... (g + 1) * L - 1`` (``L`` per rank, as
        DeepSpeed places them). One all-to-all of the ``E`` counts tells every rank how
        many rows each rank sends each of its experts; then an all-to-all with those split
        sizes brings the rows, each expert runs once on its rows from every rank, and
        the reverse all-to-all takes the outputs back. A small forward without autograd
        (a decoding step) sends the counts with the rows instead (:meth:`_send_with_counts`).
        """
        group, G = self.moe.deepspeed_moe.ep_group, self.moe.ep_size
        L = len(sizes) // G
        send_splits = _per_rank(sizes, G)
        row_bytes = x.size(1) * x.element_size()
        if not torch.is_grad_enabled() and G * most * row_bytes <= self.fused_send_max_bytes:
            got_sizes, recv_splits, pieces = self._send_with_counts(
                x, sizes, send_splits, most, group
            )
        else:
            send = torch.tensor(sizes, dtype=torch.int64, device=x.device)  # E
            recv = torch.empty_like(send)  # G x L: rows from rank g for local expert l
            dist.all_to_all_single(recv, send, group=group)
            got_sizes = recv.tolist()
            recv_splits = _per_rank(got_sizes, G)
            got = _AllToAllV.apply(group, x, recv_splits, send_splits)  # by rank, then expert
            pieces = got.split(got_sizes)  # [g * L + l]
        outs = self._experts([torch.cat(pieces[l::L]) for l in range(L)])
        # back to (rank, expert) order: expert l's rows from rank g
        back = [out.split(got_sizes[l::L]) for l, out in enumerate(outs)]
        y = torch.cat([back[l][g] for g in range(G) for l in range(L)])
        return _AllToAllV.apply(group, y, send_splits, recv_splits)

    def _send_with_counts(
        self, x: Tensor, sizes: List[int], send_splits: List[int], most: int, group
    ) -> Tuple[List[int], List[int], Tuple[Tensor, ...]]:
        """The counts all-to-all and the rows' in one: to each rank, as bytes, this rank's
        ``L`` counts for its experts then the rows, in a block sized for ``most`` rows
        (every rank knows that size; the padding is sent, never computed on).

        Returns:
            the rows' counts received (``[g * L + l]``: from rank ``g`` for local expert
            ``l``), the rows received from each rank, and the rows themselves, one tensor
            per count.
        """
        G = len(send_splits)
        L = len(sizes) // G
        C = x.size(1)
        head, row = 8 * L, C * x.element_size()
        block = head + most * row
        buf = torch.empty(G, block, dtype=torch.uint8, device=x.device)
        counts = torch.tensor(sizes, dtype=torch.int64, device=x.device).view(G, L)
        buf[:, :head] = counts.view(torch.uint8)
        rows = x.contiguous().view(torch.uint8)  # N x row
        start = 0
        for g, n in enumerate(send_splits):
            buf[g, head : head + n * row] = rows[start : start + n].reshape(-1)
            start += n
        got = torch.empty_like(buf)
        dist.all_to_all_single(got, buf, group=group)
        got_sizes = got[:, :head].contiguous().view(torch.int64).reshape(-1).tolist()
        recv_splits = _per_rank(got_sizes, G)
        pieces = []
        for g, n in enumerate(recv_splits):
            block_rows = got[g, head : head + n * row].view(x.dtype).view(n, C)
            pieces.extend(block_rows.split(got_sizes[g * L : (g + 1) * L]))
        return got_sizes, recv_splits, tuple(pieces)


def _per_rank(counts: List[int], G: int) -> List[int]:
    """Per-expert counts (``[g * L + l]``, ``L`` experts on each of ``G`` ranks) summed
    per rank: the rows sent to, or received from, each rank of the group."""
    L = len(counts) // G
    return [sum(counts[g * L : (g + 1) * L]) for g in range(G)]


class _AllToAllV(torch.autograd.Function):
    """``all_to_all_single`` with split sizes (rows sent to and received from each rank
    of ``group``); its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, group, x: Tensor, recv_splits: List[int], send_splits: List[int]) -> Tensor:
        ctx.group, ctx.splits = group, (recv_splits, send_splits)
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        recv_splits, send_splits = ctx.splits
        return None, _AllToAllV.apply(ctx.group, grad, send_splits, recv_splits), None, None
