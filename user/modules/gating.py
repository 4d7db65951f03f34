# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Routing: which expert each token goes to, with what weight, in which slot.

Pure functions on ``S x E`` fp32 router logits (``S`` tokens, ``E`` experts), after
DeepSpeed 0.19.8's ``deepspeed/moe/sharded_moe.py`` (``top1gating``, ``top2gating``,
``topkgating``; itself adapted from fairscale's ``top2gate.py``), with two
differences: the capacity is an argument (``None``: the busiest expert's count,
nothing dropped) instead of being computed inside from a factor, and the top-2 and
top-k gates take the ``used`` mask DeepSpeed's top-1 gate takes (padding takes no
route and no capacity). Given the capacity DeepSpeed would compute, each returns
DeepSpeed's sparse routes bit for bit and draws the same random numbers in the
same order (tests/test_gating.py). Every gating function returns :class:`Routes`.
Also unlike DeepSpeed: counts and slots are integers whatever the mask's dtype
(DeepSpeed's top-1 computes them in the mask's dtype: wrong beyond 256 tokens per
expert in bf16), and top-1 without a capacity keeps every route (DeepSpeed's still
runs its random selection, which can drop a route whose random number is 0.0).

:class:`Gate` is the router module: DeepSpeed's ``TopKGate`` (same ``wg`` weight,
same attributes) whose ``forward`` takes the padding mask and the capacity as
arguments and picks its gating function from :data:`GATING`. Training and
inference differ only through ``self.training`` (noise, second-expert sampling,
capacity factor, dropping); nothing is changed on the gate or on DeepSpeed's
module while it runs. :class:`~user.modules.moe_ffn.MoEFeedForward` decides the
capacity and moves the tokens.

Adding a gating policy touches:

1. this file: a function with the signature of :func:`top1gating` returning
   :class:`Routes`, and its entry in :data:`GATING`;
2. ``user/moe_options.py``: a choice of the flag that names the policy (an
   ``MoEOptions`` field), handed to :class:`Gate` as ``policy`` by
   ``ds_moe.build_moe`` (one keyword there, once, when that flag is first added;
   until then the gate picks ``top1``/``top2``/``topk`` by ``--top-k``);
3. ``tests/test_gating.py``: a test of its routes on hand-written logits.

The dispatch (local or through buffers and all-to-alls), the capacity, the
statistics and the checkpoints work on :class:`Routes` and need no change.
"""

from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from torch import Tensor, nn


class Routes(NamedTuple):
    """A gate's decisions for ``S`` tokens, ``k`` routes each (fairscale's
    ``(l_aux, combine, dispatch)`` in DeepSpeed's sparse form)."""

    #: load-balancing loss (fp32 scalar)
    l_aux: Tensor
    #: slots per expert: routes beyond it were dropped; it sizes the ``E x C`` buffers
    capacity: int
    #: ``k x S``: expert of route ``j`` of token ``s``; -1 = not routed (padding, dropped)
    indices: Tensor
    #: ``k x S``: the route's slot in its expert's buffer (0 where not routed); ``None``
    #: from :func:`no_drop_routes`: every route kept, an expert's slots in
    #: (choice, token) order
    locations: Optional[Tensor]
    #: ``k x S`` fp32: the route's weight in the combine (0 where not routed)
    gates: Tensor
    #: ``E``: routes sent to each expert, before the capacity cut
    counts: Tensor


def expert_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1, min_capacity: int = 0
) -> int:
    """Slots per expert DeepSpeed gives ``num_tokens`` tokens: ``ceil(S / E * factor * k)``,
    at least ``min_capacity``.

    The expression and its float32 arithmetic are ``sharded_moe._capacity``'s
    (``factor * k`` is made a float32 tensor first, as DeepSpeed's gates do), so the
    value is DeepSpeed's for every count and factor.

    Returns:
        int: the capacity.
    """
    cap = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * k))
    return max(int(cap.to(torch.int64)), min_capacity)


def router_z_loss(logits: Tensor, used: Optional[Tensor] = None) -> Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022, eq. 5; Megatron-Core's
    ``--moe-z-loss-coeff``): the mean over tokens of ``logsumexp(logits)^2``. It keeps
    the router logits small, where the softmax is stable in low precision.

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        used (Tensor, optional): ``S``, 0 for padding, which is left out of the mean.

    Returns:
        fp32 scalar (0 without tokens).
    """
    z = torch.logsumexp(logits, dim=-1).square()  # S
    if used is None:
        return z.sum() / max(z.numel(), 1)
    used = used.bool()
    # (where, not a product: a non-finite padding row must not make the mean NaN)
    return torch.where(used, z, z.new_zeros(())).sum() / used.sum().clamp_min(1)


def _keep(mask: Tensor, used: Optional[Tensor]) -> Tensor:
    # S x E, routes of unused tokens (padding) removed; integer arithmetic whatever
    # the dtype of ``used`` (DeepSpeed multiplies in used's dtype: counts and slots
    # lose exactness beyond 256 tokens per expert in bf16, 2048 in fp16)
    return mask if used is None else mask * used.to(mask.dtype).unsqueeze(1)


def choice_scores(gates: Tensor, bias: Optional[Tensor]) -> Tensor:
    """What a token's experts are chosen by: the gate probabilities (``S x E``), plus
    the per-expert balancing bias (``E``) when there is one (DeepSeek-V3's
    auxiliary-loss-free balancing: the bias steers the choice toward experts with less
    load; the routes' weights stay the unbiased probabilities)."""
    return gates if bias is None else gates + bias


def top1gating(
    logits: Tensor,
    capacity: Optional[int] = None,
    used: Optional[Tensor] = None,
    *,
    k: int = 1,
    noisy_gate_policy: Optional[str] = None,
    use_rts: bool = False,
    top2_2nd_expert_sampling: bool = False,
    bias: Optional[Tensor] = None,
) -> Routes:
    """DeepSpeed's ``top1gating`` (sparse routes) with the capacity given.

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        capacity (int, optional): slots per expert; each expert keeps that many of its
            tokens (the first ones, or a random selection with ``use_rts``), the rest
            are dropped. ``None``: the busiest expert's count, nothing dropped.
        used (Tensor, optional): ``S``, 1 for real tokens, 0 for padding, which then
            takes no route and no slot (the mean gate probability in ``l_aux`` still
            counts every token, as in DeepSpeed).
        k (int): 1 (the table's common signature).
        noisy_gate_policy (str, optional): ``"RSample"`` picks the expert from
            Gumbel-noised logits (the weights stay the un-noised probabilities).
        use_rts (bool): random token selection. Its random numbers are drawn also
            when nothing is dropped, as DeepSpeed does, so that the random stream
            (and dropout after it) stays DeepSpeed's.
        top2_2nd_expert_sampling (bool): ignored (top-2 only).
        bias (Tensor, optional): ``E``, added to the probabilities to choose the expert
            (:func:`choice_scores`), not to its weight.

    Returns:
        :class:`Routes` with ``k = 1``.
    """
    if noisy_gate_policy == "RSample":
        noisy = logits + sharded_moe.gumbel_rsample(logits.shape, device=logits.device)
    gates = F.softmax(logits, dim=1)  # S x E
    S, E = gates.shape
    scores = noisy if noisy_gate_policy == "RSample" else choice_scores(gates, bias)
    idx = torch.argmax(scores, dim=1)  # S
    mask = _keep(F.one_hot(idx, num_classes=E), used)  # S x E
    counts = torch.sum(mask, dim=0).detach()  # E
    l_aux = torch.sum(torch.mean(gates, dim=0) * torch.mean(mask.float(), dim=0)) * E
    # DeepSpeed's Uniform(0, 1).rsample(shape) is torch.rand(shape), bit for bit
    rand = mask * torch.rand(mask.shape, device=logits.device) if use_rts else mask
    if capacity is None:
        capacity = int(counts.max()) if S else 0
    else:
        # each expert keeps its `capacity` highest-ranked tokens (S x E, 0/1)
        top = torch.topk(rand, k=min(capacity, S), dim=0)[1]  # C x E
        mask = mask * torch.zeros_like(mask).scatter_(0, top, 1)
    idx = torch.where(mask.any(dim=1), idx, torch.full_like(idx, -1))
    locations = torch.sum((torch.cumsum(mask, dim=0) - 1) * mask, dim=1)  # S
    weights = torch.sum(gates * mask, dim=1)  # S
    return Routes(
        l_aux,
        capacity,
        idx.to(torch.int32).unsqueeze(0),
        locations.to(torch.int32).unsqueeze(0),
        weights.unsqueeze(0),
        counts,
    )


def top2gating(
    logits: Tensor,
    capacity: Optional[int] = None,
    used: Optional[Tensor] = None,
    *,
    k: int = 2,
    noisy_gate_policy: Optional[str] = None,
    use_rts: bool = False,
    top2_2nd_expert_sampling: bool = False,
    bias: Optional[Tensor] = None,
) -> Routes:
    """DeepSpeed's ``top2gating`` (sparse routes) with the capacity given and a padding mask.

    Slots go to first choices in token order, then to second choices; routes past the
    capacity are dropped. With ``used`` all ones (or ``None``) this is DeepSpeed's gate
    bit for bit, including the random numbers of second-expert sampling.

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        capacity (int, optional): slots per expert; ``None``: the busiest expert's count.
        used (Tensor, optional): ``S``, 0 for padding: no route, no slot (as in
            :func:`top1gating`: ``l_aux``'s mean probability counts every token, its
            routed fraction only the used ones).
        k (int): 2.
        top2_2nd_expert_sampling (bool): pick the second expert from Gumbel-noised logits.
        noisy_gate_policy, use_rts: ignored (DeepSpeed's top-2 gate has neither).
        bias (Tensor, optional): ``E``, added to the probabilities to choose both experts
            (:func:`choice_scores`; the second from the noised ones when sampled), not
            to their weights.

    Returns:
        :class:`Routes` with ``k = 2``; weights normalised over the token's kept routes.
    """
    gates = F.softmax(logits, dim=1)  # S x E
    S, E = gates.shape
    idx1 = torch.argmax(choice_scores(gates, bias), dim=1)  # S
    first = F.one_hot(idx1, num_classes=E)  # S x E
    if top2_2nd_expert_sampling:
        logits = logits + sharded_moe.gumbel_rsample(logits.shape, device=logits.device)
    second = logits if bias is None else choice_scores(F.softmax(logits, dim=1), bias)
    idx2 = torch.argmax(second.masked_fill(first.bool(), float("-inf")), dim=1)  # S
    mask1 = _keep(first, used)
    mask2 = _keep(F.one_hot(idx2, num_classes=E), used)
    # slots: first choices in token order, then second choices after all first ones
    loc1 = torch.cumsum(mask1, dim=0) - 1  # S x E
    loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask1.float(), dim=0)) * E * E
    counts = torch.sum(mask1 + mask2, dim=0).detach()  # E
    if capacity is None:
        capacity = int(counts.max()) if S else 0
    else:
        mask1 = mask1 * torch.lt(loc1, capacity)
        mask2 = mask2 * torch.lt(loc2, capacity)
    g1 = torch.sum(gates * mask1.float(), dim=1)  # S
    g2 = torch.sum(gates * mask2.float(), dim=1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    idx1 = torch.where(mask1.any(dim=1), idx1, torch.full_like(idx1, -1))
    idx2 = torch.where(mask2.any(dim=1), idx2, torch.full_like(idx2, -1))
    locations = torch.stack([torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)])
    return Routes(
        l_aux,
        capacity,
        torch.stack([idx1, idx2]).to(torch.int32),
        locations.to(torch.int32),
        torch.stack([g1 / denom, g2 / denom]),
        counts,
    )


def topkgating(
    logits: Tensor,
    capacity: Optional[int] = None,
    used: Optional[Tensor] = None,
    *,
    k: int,
    noisy_gate_policy: Optional[str] = None,
    use_rts: bool = False,
    top2_2nd_expert_sampling: bool = False,
    bias: Optional[Tensor] = None,
) -> Routes:
    """DeepSpeed's ``topkgating`` (sparse routes, ``drop_policy="probs"``) with the
    capacity given and a padding mask.

    Each token picks its ``k`` most probable experts; over capacity, an expert keeps
    the routes with the highest probabilities. Slots are in token order. Unlike
    DeepSpeed's, padding (``used`` 0) takes no route and no slot; with ``used`` all
    ones (or ``None``) this is DeepSpeed's gate bit for bit.

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        capacity (int, optional): slots per expert; ``None``: the busiest expert's count.
        used (Tensor, optional): ``S``, 0 for padding.
        k (int): routes per token.
        noisy_gate_policy, use_rts, top2_2nd_expert_sampling: ignored (DeepSpeed's
            top-k gate has none of them).
        bias (Tensor, optional): ``E``, added to the probabilities to choose the experts
            (:func:`choice_scores`), not to their weights.

    Returns:
        :class:`Routes`; weights normalised over the token's kept routes.
    """
    gates = F.softmax(logits, dim=1)  # S x E
    S, E = gates.shape
    if bias is None:
        top_gate, top_idx = torch.topk(gates, k=k, dim=1)  # S x k
    else:
        top_idx = torch.topk(choice_scores(gates, bias), k=k, dim=1)[1]
        top_gate = gates.gather(1, top_idx)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, 1)  # S x E
    if used is not None:
        mask &= used.bool().unsqueeze(1)
    counts = torch.sum(mask, dim=0).detach()  # E
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask.float(), dim=0)) * E * E / k
    if capacity is None:
        capacity = int(counts.max()) if S else 0
    else:
        ranked = torch.zeros_like(gates).scatter(1, top_idx, top_gate)  # S x E
        if used is not None:
            ranked = ranked.masked_fill(~used.bool().unsqueeze(1), 0.0)
        _, chosen = torch.topk(ranked, k=min(capacity, S), dim=0, sorted=False)  # C x E
        mask &= torch.zeros_like(gates, dtype=torch.bool).scatter_(0, chosen, True)
    locations = torch.cumsum(mask, dim=0) - 1  # S x E
    weights = gates * mask
    weights = weights / torch.clamp(
        torch.sum(weights, dim=-1, keepdim=True), min=torch.finfo(weights.dtype).eps
    )
    kept = mask.gather(1, top_idx)  # S x k
    route_idx = torch.where(kept, top_idx, torch.full_like(top_idx, -1))
    # k x S, contiguous (DeepSpeed's _stack_routes)
    return Routes(
        l_aux,
        capacity,
        route_idx.t().contiguous().to(torch.int32),
        (locations.gather(1, top_idx) * kept).t().contiguous().to(torch.int32),
        weights.gather(1, top_idx).t().contiguous(),
        counts,
    )


def no_drop_routes(logits: Tensor, k: int, bias: Optional[Tensor] = None) -> Routes:
    """Top-1/top-2 routes without dropping, for inference: DeepSpeed's formulas
    without the capacity machinery.

    The same values as :func:`top1gating`/:func:`top2gating` with ``capacity=None``,
    no noise, no sampling, no random token selection (and DeepSpeed's gates with
    ``drop_tokens=False``), bit for bit: fp32 softmax, the first maximum, for top-2
    the second expert as the argmax of the other logits and both weights normalised;
    a one-hot mean is the count over S, a masked sum the gathered value. About a
    dozen small ops: an incremental decoding step calls this once per MoE layer.

    Args:
        logits (Tensor): ``S x E`` fp32 router logits.
        k (int): 1 or 2.
        bias (Tensor, optional): ``E``, added to the probabilities to choose the experts
            (:func:`choice_scores`), not to their weights.

    Returns:
        :class:`Routes` with ``locations=None`` (every route kept; an expert's slots
        in (choice, token) order) and the busiest expert's count as capacity.
    """
    S, num_experts = logits.shape
    gates = torch.softmax(logits, dim=1)  # S x E
    if bias is None:
        g1, idx1 = torch.max(gates, dim=1)  # the first maximum, as argmax
    else:
        idx1 = torch.argmax(choice_scores(gates, bias), dim=1)
        g1 = gates.gather(1, idx1.unsqueeze(1)).squeeze(1)
    me = torch.mean(gates, dim=0)
    if k == 1:
        counts = torch.bincount(idx1, minlength=num_experts)
        l_aux = torch.sum(me * (counts.float() / S)) * num_experts
        return Routes(
            l_aux, int(counts.max()) if S else 0, idx1.unsqueeze(0), None, g1.unsqueeze(0), counts
        )
    if k != 2:
        raise ValueError(f"no_drop_routes handles top-1 and top-2, not top-{k}")
    mask1 = F.one_hot(idx1, num_classes=num_experts)  # S x E
    second = logits if bias is None else choice_scores(gates, bias)
    idx2 = torch.argmax(second.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(idx2, num_classes=num_experts)
    l_aux = torch.mean(me * torch.mean(mask1.float(), dim=0)) * num_experts * num_experts
    g2 = gates.gather(1, idx2.unsqueeze(1)).squeeze(1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    counts = torch.sum(mask1 + mask2, dim=0)
    return Routes(
        l_aux,
        int(counts.max()) if S else 0,
        torch.stack([idx1, idx2]),
        None,
        torch.stack([g1 / denom, g2 / denom]),
        counts,
    )


#: A gating function: ``(logits S x E, capacity, used, *, k, noisy_gate_policy, use_rts,
#: top2_2nd_expert_sampling, bias) -> Routes``. Options a policy has no use for are ignored
#: (``user/moe_options.py`` refuses combinations that would need them).
GatingFn = Callable[..., Routes]

#: The gating policies, by name: :class:`Gate` calls ``GATING[gate.policy]``. Read-only
#: (no module-level mutable state): a policy is added here, in the source.
GATING: Mapping[str, GatingFn] = MappingProxyType(
    {
        "top1": top1gating,
        "top2": top2gating,
        "topk": topkgating,
    }
)

#: Policies with a cheaper inference path without dropping (:func:`no_drop_routes`).
NO_DROP_POLICIES = frozenset({"top1", "top2"})


def policy_for(k: int) -> str:
    """The gating policy DeepSpeed's ``TopKGate`` uses for ``k`` routes per token."""
    return {1: "top1", 2: "top2"}.get(k, "topk")


class Gate(sharded_moe.TopKGate):
    """The router of an MoE layer: DeepSpeed's ``TopKGate`` with the capacity and the
    padding mask as arguments of ``forward``.

    Its attributes are DeepSpeed's and keep the built options
    (``capacity_factor``, ``drop_tokens``, ... never change), plus
    ``eval_drop_tokens``, ``num_experts`` and ``policy``. ``forward`` returns
    :class:`Routes`; DeepSpeed's ``MOELayer.forward``, which cannot pass a capacity,
    cannot drive it (``MoEFeedForward`` dispatches).

    Args:
        wg (nn.Linear): the router weight (``E x C``, no bias), e.g. DeepSpeed's gate's
            ``wg``: kept as is, so its name, value and the random stream stay DeepSpeed's.
        k (int): routes per token.
        capacity_factor (float): capacity factor in training.
        eval_capacity_factor (float): capacity factor in inference.
        min_capacity (int): minimum slots per expert.
        noisy_gate_policy (str, optional): ``None``, ``"Jitter"`` or ``"RSample"``
            (training only).
        drop_tokens (bool): drop tokens over capacity in training.
        eval_drop_tokens (bool): the same in inference.
        use_rts (bool): random token selection (top-1).
        top2_2nd_expert_sampling (bool): Gumbel-sampled second expert (top-2, training only).
        policy (str, optional): a key of :data:`GATING`; default by ``k``
            (:func:`policy_for`).
        balance_rate (float): auxiliary-loss-free balancing (DeepSeek-V3) when above 0:
            a per-expert bias (the buffer ``expert_bias``, saved with the model) is
            added to the probabilities that choose the experts, and after each update
            :meth:`balance` moves it by this much toward an even load. 0: no bias.
    """

    def __init__(
        self,
        wg: nn.Linear,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        noisy_gate_policy: Optional[str] = None,
        drop_tokens: bool = True,
        eval_drop_tokens: bool = False,
        use_rts: bool = True,
        top2_2nd_expert_sampling: bool = True,
        policy: Optional[str] = None,
        balance_rate: float = 0.0,
    ) -> None:
        # TopKGate builds a router of its own: on the meta device it costs no memory
        # and draws no random number
        with torch.device("meta"):
            super().__init__(
                wg.in_features,
                wg.out_features,
                k,
                capacity_factor,
                eval_capacity_factor,
                min_capacity,
                noisy_gate_policy,
                drop_tokens,
                use_rts,
                None,
                top2_2nd_expert_sampling,
            )
        self.wg = wg
        self.num_experts = wg.out_features
        self.eval_drop_tokens = eval_drop_tokens
        self.policy = policy if policy is not None else policy_for(k)
        if self.policy not in GATING:
            raise ValueError(f"unknown gating policy {self.policy!r}; known: {sorted(GATING)}")
        self.balance_rate = balance_rate
        on = balance_rate > 0  # (a None buffer is not saved)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts) if on else None)
        self.load = torch.zeros(self.num_experts) if on else None  # routes since the update

    def _apply(self, fn, *args, **kwargs):
        # the bias stays fp32 when the model goes fp16/bf16 (fairseq's --fp16 calls
        # model.half()): bf16 cannot add 0.001 to 0.5, fp16 not to 4
        super()._apply(fn, *args, **kwargs)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self._buffers["expert_bias"] = self.expert_bias.float()
        return self

    def count_load(self, counts: Tensor) -> None:
        """Add a training forward's routes per expert (``E``) to the update's load (the
        layer calls it in training, when the gate balances: ``load`` is not None)."""
        self.load = self.load.to(counts.device) + counts.detach().float()

    @torch.no_grad()
    def balance(self, load: Tensor) -> None:
        """After an update: raise the bias of each expert below the mean of ``load``
        (``E``, routes per expert over every process), lower it above, by
        ``balance_rate`` (DeepSeek-V3's sign update), and start the next update's count."""
        self.expert_bias += self.balance_rate * torch.sign(load.mean() - load).to(self.expert_bias)
        self.load = torch.zeros_like(self.load)

    def drops(self) -> bool:
        """Whether this gate drops routes over capacity now (training or inference)."""
        return self.drop_tokens if self.training else self.eval_drop_tokens

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens with the training or evaluation
        capacity factor (:func:`expert_capacity`). A factor above experts / k, where every
        token fits, counts as that: a larger one only enlarged the buffers, and a huge
        one (1e30) overflowed DeepSpeed's float32 capacity to the minimum."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        factor = min(factor, self.num_experts / self.k)
        return expert_capacity(num_tokens, self.num_experts, factor, self.k, self.min_capacity)

    def router_logits(self, input: Tensor) -> Tensor:
        """``S x E`` fp32 router logits of ``input`` (``S x C``, any float dtype), no noise."""
        return F.linear(input.float(), self.wg.weight.float())

    def forward(
        self, input: Tensor, used: Optional[Tensor] = None, *, capacity: Optional[int] = None
    ) -> Routes:
        """Route ``input`` (``S x C``).

        Args:
            input (Tensor): ``S x C`` tokens.
            used (Tensor, optional): ``S``, 0 for padding; applied when a capacity is
                given (padding then takes no slot). Without dropping it could take no
                token's slot; it stays routed and counted, as it always was.
            capacity (int, optional): slots per expert, routes beyond it dropped;
                ``None``: the busiest expert's count, nothing dropped.

        Returns:
            :class:`Routes`, computed in fp32 whatever the dtype of ``input``.
        """
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = sharded_moe.multiplicative_jitter(x, device=input.device)
        logits = self.router_logits(x)  # S x E
        return GATING[self.policy](
            logits,
            capacity,
            used if capacity is not None else None,
            k=self.k,
            noisy_gate_policy=self.noisy_gate_policy if self.training else None,
            use_rts=self.use_rts,
            top2_2nd_expert_sampling=self.top2_2nd_expert_sampling and self.training,
            bias=self.expert_bias,
        )
