# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE model started from a
trained dense Transformer.

Every expert (and the PR-MoE residual FFN, if any) of an MoE layer starts as a
copy of the dense FFN (``fc1``/``fc2``) it replaces; every other parameter is
copied by name; the routers keep their fresh initialisation. At step 0, with
top-2 (normalised gate weights) and no dropped token, the MoE model computes
exactly what the dense one does; with top-1 each token's FFN output is the
dense one times its gate probability.

Used by ``--upcycle-from DENSE.pt`` (task option): applied when training
starts from scratch; a run that resumes from its own checkpoint ignores it.
"""

import logging
import re
from typing import Dict, List, Tuple

from torch import Tensor

from ..errors import PluginError
from . import io

logger = logging.getLogger(__name__)

# <layer>.moe_ffn.moe.deepspeed_moe.experts.deepspeed_experts.<i>.fc1.weight -> <layer>.fc1.weight
_FROM_DENSE = re.compile(
    r"^(.*)\.moe_ffn\.moe\.(?:deepspeed_moe\.experts\.deepspeed_experts\.\d+|mlp)\.(fc[12]\.(?:weight|bias))$"
)
_FRESH = re.compile(r"\.moe_ffn\.moe\.(deepspeed_moe\.gate\.|coefficient\.)")


class UpcycleError(PluginError, ValueError):
    """The dense checkpoint does not fit the MoE model."""


def upcycle_state(
    dense: Dict[str, Tensor], moe: Dict[str, Tensor]
) -> Tuple[Dict[str, Tensor], List[str]]:
    """The MoE model's state dict filled from a dense model's.

    Args:
        dense: the dense model's state dict (same architecture without MoE).
        moe: the MoE model's current state dict (its routers are kept).

    Returns:
        ``(state, fresh)``: the new state dict and the names left at their fresh
        initialisation (the routers).

    Raises:
        UpcycleError: a parameter the dense model lacks or whose shape differs.
    """
    out: Dict[str, Tensor] = {}
    fresh: List[str] = []
    for name, value in moe.items():
        m = _FROM_DENSE.match(name)
        src = f"{m.group(1)}.{m.group(2)}" if m else name
        if src in dense:
            if dense[src].shape != value.shape:
                raise UpcycleError(
                    f"--upcycle-from: {src} has shape {tuple(dense[src].shape)} in the dense "
                    f"checkpoint but {name} has {tuple(value.shape)}: use the dense model's "
                    "dimensions (embed/FFN sizes, layers, dictionary)"
                )
            out[name] = dense[src].to(value.dtype)
        elif _FRESH.search(name):
            out[name] = value
            fresh.append(name)
        else:
            raise UpcycleError(
                f"--upcycle-from: the dense checkpoint has no {src} (for {name}); it must be "
                "the same Transformer architecture trained without --deepspeed_moe"
            )
    return out, fresh


def is_dense_state(state: Dict[str, Tensor]) -> bool:
    """True when a model state dict has no MoE layer."""
    return not any(".moe_ffn." in k for k in state)


def upcycle_model(model, path: str) -> None:
    """Load the dense checkpoint ``path`` into the MoE ``model`` (see the module docstring)."""
    dense = io.read_checkpoint(path)
    if not is_dense_state(dense["model"]):
        raise UpcycleError(f"--upcycle-from {path}: this checkpoint already has MoE layers")
    state, fresh = upcycle_state(dense["model"], model.state_dict())
    model.load_state_dict(state)
    logger.info(
        f"upcycled from dense checkpoint {path}: experts copy its FFNs, "
        f"{len(fresh)} router tensors start fresh"
    )
