# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""All of the plugin's contact with DeepSpeed lives here.

Importing this module picks DeepSpeed's accelerator before DeepSpeed is
imported (CPU when torch sees no CUDA device, so users need no
``DS_ACCELERATOR`` variable), and provides:

* :func:`build_moe`: a ``deepspeed.moe.layer.MoE`` whose experts each get their
  own initialisation, seeded by the expert's *global* index so that the same
  model is built whatever the expert-parallel size;
* :func:`setup_expert_parallel`: DeepSpeed's communication backend and expert
  process groups, created once, after fairseq's distributed setup (or not at
  all in a single process with ``--ep-world-size 1``, where DeepSpeed's MoE
  needs no collective).
"""

import logging
import os
import zlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # DeepSpeed probes for accelerators at import and warns on CPU; say it up front.
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.utils import groups  # noqa: E402

from .moe_options import MoEOptions, MoEArgumentError  # noqa: E402

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
    # DeepSpeed deep-copies one expert: without this every expert starts equal.
    local = moe.deepspeed_moe.experts.deepspeed_experts
    first = expert_parallel_rank(opts.ep_size) * len(local)
    for i, e in enumerate(local):
        _reset_parameters(e, expert_seed(base_seed, layer_key, first + i))
    return moe


def moe_gate(moe: MoE) -> nn.Module:
    """The router (``TopKGate``) of a DeepSpeed MoE layer."""
    return moe.deepspeed_moe.gate


def local_experts(moe: MoE) -> Iterable[nn.Module]:
    """The experts held by this process."""
    return moe.deepspeed_moe.experts.deepspeed_experts


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """True for parameters DeepSpeed keeps rank-local (experts, not the router)."""
    return getattr(param, "allreduce", True) is False


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
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if world % ep_size != 0:
        raise MoEArgumentError(
            f"--ep-world-size {ep_size} must divide the number of processes "
            f"({world}); use --ep-world-size {world} (expert parallel across all "
            f"processes) or a divisor of it"
        )
    if not distributed:
        # One process, EP=1: DeepSpeed's MoE runs without any process group.
        return
    if not deepspeed.comm.is_initialized():
        # Wraps the process group fairseq created; no second rendezvous.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    for moe in moe_layers:
        if moe.ep_size != ep_size:
            raise ValueError(f"MoE layer built with ep_size {moe.ep_size}, expected {ep_size}")
        if moe.deepspeed_moe.ep_group is None:
            moe.set_deepspeed_parallelism()


def expert_data_parallel_group(ep_size: int):
    """Process group over which expert gradients are averaged (W/E ranks)."""
    return groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")
