# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Checkpoints of MoE models: expert shards, resharding, upcycling.

* :mod:`.format`: what a checkpoint holds (parameter names, the shard record and its
  format version, gather/scatter between layouts); pure functions.
* :mod:`.io`: files (atomic writes and copies, reading shards once, pruning) and
  :func:`load_consolidated`, the one way to read any checkpoint as a single state.
* :mod:`.fairseq_hooks`: what fairseq's save and load functions do in addition
  (installed by ``user/patches.py``).
* :mod:`.reshard` (``python -m user.reshard``) and :mod:`.upcycle` (``--upcycle-from``).
"""

from .format import ExpertCheckpointError, ExpertLayout
from .io import load_consolidated
from .upcycle import UpcycleError

__all__ = ["ExpertCheckpointError", "ExpertLayout", "UpcycleError", "load_consolidated"]
