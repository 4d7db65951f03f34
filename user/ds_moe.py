# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""DeepSpeed's MoE layers and expert process groups, as the plugin builds and uses them.

Routing (``modules/gating.py``) and dispatch (``modules/moe_ffn.py``) call
``deepspeed.moe.sharded_moe`` helpers directly; the accelerator choice, before DeepSpeed
is imported, is a patch in ``user/patches.py``. Provides:

* :func:`build_moe`: a ``deepspeed.moe.layer.MoE`` whose experts each get their
  own initialisation, seeded by the expert's *global* index so that the same
  model is built whatever the expert-parallel size;
* :func:`setup_expert_parallel`: DeepSpeed's communication backend and expert
  process groups, created once, after fairseq's distributed setup (or not at
  all in a single process with ``--ep-world-size 1``, where DeepSpeed's MoE
  needs no collective); each rank then logs the groups it holds
  (:func:`log_expert_groups`);
* expert gradients: reduced over their expert-data-parallel group, and counted
  once in ``--clip-norm``'s global norm.
"""

import contextlib
import json
import logging
import os
import zlib
from typing import Iterable, List, Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from . import patches
from .modules.gating import Gate
from .moe_options import MoEOptions

logger = logging.getLogger(__name__)


def expert_seed(base_seed: int, layer_key: str, expert_index: int) -> int:
    """Seed for one expert's initialisation.

    Depends only on the run seed, the layer and the expert's global index, so
    EP=1 and EP=N runs build identical experts and no two experts are equal.

    Args:
        base_seed (int): the run's ``--seed``.
        layer_key (str): a name unique to the MoE layer, e.g. ``"encoder.1"``.
        expert_index (int): global expert index in ``[0, num_experts)``.
    """
    return zlib.crc32(f"{base_seed}/{layer_key}/{expert_index}".encode()) & 0x7FFFFFFF


def process_count() -> int:
    """Processes in this run (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank inside its expert-parallel group.

    DeepSpeed groups consecutive global ranks (``[0..E-1], [E..2E-1], ...``)
    into expert-parallel groups, so the rank inside the group is ``rank % E``.
    """
    if ep_size == 1 or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank() % ep_size


def _reset_parameters(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if m is not module and hasattr(m, "reset_parameters"):
                m.reset_parameters()


def build_moe(
    hidden_size: int,
    expert: nn.Module,
    opts: MoEOptions,
    layer_key: str,
    base_seed: int,
) -> MoE:
    """Build a DeepSpeed MoE layer around ``expert`` with every gate option set.

    Its gate is the plugin's :class:`~user.modules.gating.Gate`, in place of
    DeepSpeed's ``TopKGate`` and holding that gate's router (``deepspeed_moe.gate.wg``):
    same parameter name, same initial weights, same random numbers drawn.

    Args:
        hidden_size (int): model dimension (input and output of the layer).
        expert (nn.Module): one expert; DeepSpeed deep-copies it per local expert.
        opts (MoEOptions): validated MoE options.
        layer_key (str): unique layer name, used to seed the experts.
        base_seed (int): the run's seed.
    """
    moe = MoE(
        hidden_size=hidden_size,
        expert=expert,
        num_experts=opts.num_experts,
        ep_size=opts.ep_size,
        k=opts.top_k,
        capacity_factor=opts.capacity_factor,
        eval_capacity_factor=opts.eval_capacity_factor,
        min_capacity=opts.min_capacity,
        use_residual=opts.use_residual,
        noisy_gate_policy=opts.noisy_gate_policy,
        drop_tokens=opts.drop_tokens,
        use_rts=opts.use_rts,
        top2_2nd_expert_sampling=opts.top2_2nd_expert_sampling,
    )
    ds_gate = moe.deepspeed_moe.gate
    moe.deepspeed_moe.gate = Gate(
        ds_gate.wg,
        k=opts.top_k,
        capacity_factor=opts.capacity_factor,
        eval_capacity_factor=opts.eval_capacity_factor,
        min_capacity=opts.min_capacity,
        noisy_gate_policy=opts.noisy_gate_policy,
        drop_tokens=opts.drop_tokens,
        eval_drop_tokens=opts.eval_drop_tokens,
        use_rts=opts.use_rts,
        top2_2nd_expert_sampling=opts.top2_2nd_expert_sampling,
        balance_rate=opts.bias_balance,
    )
    # DeepSpeed deep-copies one expert: without this every expert starts equal.
    local = moe.deepspeed_moe.experts.deepspeed_experts
    first = expert_parallel_rank(opts.ep_size) * len(local)
    for i, e in enumerate(local):
        _reset_parameters(e, expert_seed(base_seed, layer_key, first + i))
    return moe


def moe_gate(moe: MoE) -> Gate:
    """The router of a DeepSpeed MoE layer built by :func:`build_moe`."""
    return moe.deepspeed_moe.gate


def local_experts(moe: MoE) -> Iterable[nn.Module]:
    """The experts held by this process."""
    return moe.deepspeed_moe.experts.deepspeed_experts


def expert_params(moe: MoE) -> List[nn.Parameter]:
    """Parameters of this process's experts (not the router)."""
    return list(moe.deepspeed_moe.experts.parameters())


def runs_plain(moe: MoE) -> bool:
    """Whether nothing but the gate, the experts and the combine happens in ``moe``: no
    residual MLP, no tensor-parallel experts, no Tutel. Then
    :class:`~user.modules.moe_ffn.MoEFeedForward` can run each expert on exactly its
    routes instead of DeepSpeed's padded ``experts x capacity`` buffer: in this process
    (the local path) or across the expert-parallel group (the exchange)."""
    layer = moe.deepspeed_moe
    return not moe.use_residual and not layer.use_tutel and groups.mpu is None


def local_dispatch_supported(moe: MoE) -> bool:
    """Whether every expert of ``moe`` is in this process (no all-to-all) and it
    :func:`runs_plain`: the local path."""
    return moe.ep_size == 1 and runs_plain(moe)


def exchange_supported(moe: MoE) -> bool:
    """Whether ``moe`` is expert parallel and :func:`runs_plain`: the exchange."""
    return moe.ep_size > 1 and runs_plain(moe)


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """True for parameters DeepSpeed keeps rank-local (experts, not the router)."""
    return getattr(param, "allreduce", True) is False


def agree_on_token_counts(counts: Sequence[int], ep_size: int) -> List[int]:
    """Largest of each count over the expert-parallel group, in one all-reduce.

    Every rank of an expert-parallel group must size its all-to-all buffers
    alike; they are sized from the token count, which differs between ranks.
    """
    t = torch.tensor(list(counts), dtype=torch.int64)
    if ep_size > 1 and dist.is_available() and dist.is_initialized():
        group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def _balancing_gates(model: torch.nn.Module) -> List[Gate]:
    """The gates with a balancing bias (``--moe-bias-balance``)."""
    return [m for m in model.modules() if isinstance(m, Gate) and m.load is not None]


def balance_gates(model: torch.nn.Module) -> None:
    """After an update, move the balancing bias of every gate that has one
    (``--moe-bias-balance``) from its load: the routes per expert of the update's
    training forwards, summed over every process in one all-reduce (every process holds
    every gate, and their biases stay equal)."""
    gates = _balancing_gates(model)
    if not gates:
        return
    load = torch.stack([g.load.to(g.expert_bias.device) for g in gates])  # layers x E
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(load)
    for gate, row in zip(gates, load):
        gate.balance(row)


@contextlib.contextmanager
def uncounted_load(model: torch.nn.Module):
    """Routes of the forwards inside do not count toward the gates' load (fairseq's
    dummy batches: a rank without data replays an earlier batch, ignoring its gradient)."""
    gates = _balancing_gates(model)
    saved = [g.load for g in gates]
    try:
        yield
    finally:
        for gate, load in zip(gates, saved):
            gate.load = load


def reduce_expert_grads(params: Iterable[torch.nn.Parameter], ep_size: int) -> None:
    """Sum expert gradients over their expert-data-parallel group, divided by the world size.

    fairseq's DDP averages the other gradients over all W ranks (sum / W) before
    the trainer scales everything by ``W / sample_size``; an expert's gradient
    already holds its whole expert-parallel group's tokens (the all-to-all brought
    them), so its replicas in the W/E-rank expert-data-parallel group are summed
    and divided by W: both kinds then end as sum-over-all-tokens / sample_size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    group = groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")
    if dist.get_world_size(group) == 1:
        # E = W: nothing to sum (no flat copy needed)
        torch._foreach_div_(grads, world)
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None, _fairseq=None) -> torch.Tensor:
    """fairseq's ``clip_grad_norm_``, with expert gradients counted once.

    fairseq leaves parameters marked ``expert`` out of the norm (and clips them
    with the others' coefficient), so with expert parallelism the norm missed
    every expert and differed from the same model on one process. Here the
    global norm is ``sqrt(|non-expert grads|^2 + sum over the expert-parallel
    group of |local expert grads|^2)``: each expert counted once (its replicas in
    the expert-data-parallel group hold equal, already reduced gradients), one
    all-reduce per update.

    Args:
        params: the optimizer's parameters.
        max_norm (float): ``--clip-norm`` (0: only compute the norm).
        aggregate_norm_fn: fairseq's aggregation (FSDP), applied to the non-expert part.
    """
    params = [p for p in params if p is not None and getattr(p, "grad", None) is not None]
    experts = [p for p in params if hasattr(p, "expert")]
    if not experts or not (dist.is_available() and dist.is_initialized()):
        return _fairseq(params, max_norm, aggregate_norm_fn)
    dense = [p.grad.detach() for p in params if not hasattr(p, "expert")]
    local = [p.grad.detach() for p in experts]
    sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in local]).sum()
    group = groups._get_expert_parallel_group(experts[0].group_name)
    if dist.get_backend(group) == "nccl":
        sq = sq.cuda()
    dist.all_reduce(sq, group=group)
    dense_norm = (
        torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in dense])
        )
        if dense
        else sq.new_zeros(())
    )
    if aggregate_norm_fn is not None:
        dense_norm = aggregate_norm_fn(dense_norm)
    total = (dense_norm.to(sq.device) ** 2 + sq) ** 0.5
    if max_norm > 0:
        coef = (float(max_norm) / (total + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(dense + local, coef.to(local[0].device))
    return total


def setup_expert_parallel(moe_layers: Iterable[MoE], ep_size: int) -> None:
    """Create DeepSpeed's expert groups and attach them to the MoE layers.

    Call once after the model is built (fairseq has already initialised
    ``torch.distributed`` when running on several processes).

    Args:
        moe_layers: the model's DeepSpeed ``MoE`` modules.
        ep_size (int): ``--ep-world-size``.
    """
    moe_layers = list(moe_layers)
    if not moe_layers:
        return
    # (--ep-world-size dividing the processes is checked with the flags: moe_options)
    if ep_size == 1:
        # Experts replicated on every rank: fairseq's DDP reduces them like any
        # parameter and DeepSpeed's MoE needs no process group.
        return
    patches.install(patches.EXPERT_PARALLEL)
    if not deepspeed.comm.is_initialized():
        # Wraps the process group fairseq created; no second rendezvous.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    for moe in moe_layers:
        if moe.ep_size != ep_size:
            raise ValueError(f"MoE layer built with ep_size {moe.ep_size}, expected {ep_size}")
        if moe.deepspeed_moe.ep_group is None:
            moe.set_deepspeed_parallelism()
        for p in moe.deepspeed_moe.experts.parameters():
            # fairseq's legacy_ddp and clip_grad_norm_ skip parameters marked
            # "expert"; reduce_expert_grads reduces them in their own group.
            p.expert = True
    log_expert_groups(moe_layers[0].expert_group_name)


def log_expert_groups(group_name: str) -> None:
    """Log, on every rank, the ranks of the expert groups this rank holds.

    One INFO line, ``expert groups {json}``: ``rank`` (global), ``node`` (torchrun's
    ``GROUP_RANK``, else SLURM's ``SLURM_NODEID``), ``local_rank`` (``LOCAL_RANK``,
    else ``SLURM_LOCALID``; both None without such a launcher), and the ranks of
    ``expert_parallel`` and ``expert_data_parallel``, read from the process groups
    DeepSpeed created. ``mt_run.fairseq_log.expert_groups`` reads it back.

    Args:
        group_name (str): DeepSpeed's name of the groups (``ep_size_<E>``).
    """

    def env_int(*names):
        found = [os.environ[n] for n in names if os.environ.get(n, "").isdigit()]
        return int(found[0]) if found else None

    held = {
        "rank": dist.get_rank(),
        "node": env_int("GROUP_RANK", "SLURM_NODEID"),
        "local_rank": env_int("LOCAL_RANK", "SLURM_LOCALID"),
        "expert_parallel": dist.get_process_group_ranks(
            groups._get_expert_parallel_group(group_name)
        ),
        "expert_data_parallel": dist.get_process_group_ranks(
            groups._get_expert_data_parallel_group(group_name)
        ),
    }
    # fairseq raises the root logger to WARNING on every rank but the first; this line
    # is each rank's own, so its logger keeps INFO
    out = logging.getLogger(f"{__name__}.groups")
    out.setLevel(logging.INFO)
    out.info(f"expert groups {json.dumps(held)}")
