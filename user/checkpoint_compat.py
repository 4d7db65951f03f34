# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Let fairseq read its own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load`` weights-only by default; fairseq checkpoints
hold an ``argparse.Namespace`` and omegaconf objects, so every load fails.
fairseq's checkpoint module gets a ``torch`` whose ``load`` defaults to
``weights_only=False``: those files are the user's own training checkpoints.
So does ``fairseq.distributed.utils``, which sends a loaded checkpoint from
rank 0 to the other ranks through ``torch.save``/``torch.load`` (a
multi-process resume fails there otherwise). Other ``torch.load`` calls in the
process keep torch's default.
"""

import types

import torch
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils


class _TorchForFairseqCheckpoints(types.ModuleType):
    """``torch`` with ``load(..., weights_only=False)`` unless the caller says otherwise."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def install() -> None:
    """Patch ``fairseq.checkpoint_utils`` and ``fairseq.distributed.utils`` once (idempotent)."""
    for module in (checkpoint_utils, distributed_utils):
        if not isinstance(module.torch, _TorchForFairseqCheckpoints):
            module.torch = _TorchForFairseqCheckpoints()
