# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""How fairseq's checkpoint functions learn about expert shards.

fairseq saves a checkpoint from rank 0 only and loads it through
``checkpoint_utils.load_checkpoint_to_cpu``, which knows nothing of the model. The
functions here wrap fairseq's (``user/patches.py`` installs them; each takes the
original function first) and only act for the ``translation_deepspeed`` task:

* :func:`save_checkpoint` (expert parallelism): every expert-parallel rank writes
  its shard, then fairseq writes the shared file that names them, then shards no
  checkpoint names are pruned;
* :func:`load_checkpoint` (resume): the checkpoint is checked against the model just
  built, converted to the running layout, each rank's experts and their optimizer
  state restored; a finished run trains nothing; ``--upcycle-from`` applies;
* :func:`load_checkpoint_to_cpu` (every read while the task is in use): a read error
  names the file and the way back; a checkpoint of another expert-parallel layout
  is converted (gathered, and cut to the running layout).

fairseq's trainer calls ``load_checkpoint_to_cpu`` without the task, so
:func:`load_checkpoint` hands the task's :class:`~.format.ExpertLayout` down through
a context variable set for the duration of that one call.
"""

import contextvars
import logging
import os
import pickle
import secrets
import zipfile
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .. import ds_moe
from . import format as fmt
from . import io, upcycle

logger = logging.getLogger(__name__)

# Set while the translation_deepspeed task's trainer loads a checkpoint: a _TrainerLoad
# with the layout of the model just built (None for a dense one). Unset outside such a
# load (generation, hub, tools: the layout then follows the processes).
_LOADING_INTO: contextvars.ContextVar = contextvars.ContextVar("moe_loading_into", default=None)


@dataclass(frozen=True)
class _TrainerLoad:
    layout: Optional[fmt.ExpertLayout]


def _unreadable(e: Exception) -> bool:
    """Whether ``e`` is torch failing to read a damaged file (truncated, not a checkpoint)."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return True
    return isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)


def _ours(task) -> bool:
    from ..tasks.translation_deepspeed import TranslationDeepSpeedTask

    return isinstance(task, TranslationDeepSpeedTask)


def _dist_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_token() -> str:
    token = [secrets.token_hex(4)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


# --------------------------------------------------------------------------
# live trainer <-> shards


def _torch_optimizer(trainer):
    opt = trainer.optimizer
    if getattr(opt, "fp32_params", None) is not None:
        raise fmt.ExpertCheckpointError(
            "fairseq's FP16Optimizer keeps one fp32 copy of all parameters, so a rank's "
            "expert optimizer state cannot be saved on its own: with --ep-world-size > 1 "
            "use --memory-efficient-fp16 / --memory-efficient-bf16"
        )
    return opt.optimizer


def optimizer_param_names(trainer) -> List[str]:
    """This rank's parameter names in the optimizer's order."""
    names = {id(p): n for n, p in trainer.get_model().named_parameters()}
    groups = _torch_optimizer(trainer).param_groups
    return [names[id(p)] for g in groups for p in g["params"]]


def build_shard(trainer, info: dict, ep_rank: int, with_optimizer: bool) -> dict:
    """This rank's experts and their optimizer state, named by global expert index."""
    first = ep_rank * (info["num_experts"] // info["ep_size"])
    params = [
        (n, p) for n, p in trainer.get_model().named_parameters() if fmt.expert_index(n) is not None
    ]
    model = {fmt.shift_expert(n, first): p.detach().cpu().clone() for n, p in params}
    optimizer = None
    if with_optimizer:
        state = _torch_optimizer(trainer).state
        optimizer = {
            fmt.shift_expert(n, first): {
                k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                for k, v in state[p].items()
            }
            for n, p in params
            if p in state
        }
    return fmt.make_shard(info, ep_rank, model, optimizer)


def restore_local_experts(
    model,
    shards: Callable[[int], dict],
    info: dict,
    ep_rank: int,
    ep_size: int,
    opt_state: Optional[dict] = None,
    weights: bool = True,
) -> None:
    """Load this rank's experts (and optimizer state) from a checkpoint's shards.

    Args:
        model: the running model (this rank's local experts).
        shards: ``rank -> shard`` of the checkpoint being loaded (its layout
            may differ from the running one).
        info: the checkpoint's ``ep_size`` and ``num_experts``.
        ep_rank (int): this process's expert-parallel rank.
        ep_size (int): the running expert-parallel size.
        opt_state: the torch optimizer's ``state`` (parameter -> dict) to fill,
            or ``None`` to leave the optimizer alone.
        weights (bool): copy the expert weights (else only optimizer state).
    """
    local = info["num_experts"] // ep_size
    old_local = info["num_experts"] // info["ep_size"]
    first = ep_rank * local
    for n, p in model.named_parameters():
        if fmt.expert_index(n) is None:
            continue
        g = fmt.shift_expert(n, first)
        shard = shards(fmt.expert_index(g) // old_local)
        if weights:
            with torch.no_grad():
                p.copy_(shard["model"][g].to(p.dtype))
        if opt_state is not None and g in shard.get("optimizer", {}):
            opt_state[p] = {
                k: (v.to(p.device).clone() if torch.is_tensor(v) else v)
                for k, v in shard["optimizer"][g].items()
            }


def restore_model_experts(model, reader: io.ShardReader) -> None:
    """Give this rank's part of an expert-parallel model its own experts (the
    model's ``load_state_dict`` calls this with the :data:`~.format.MODEL_KEY` entry)."""
    ep = model.moe_opts.ep_size
    if ep > 1:
        restore_local_experts(model, reader, reader.info, ds_moe.expert_parallel_rank(ep), ep)


def load_for_rank(path: str, model, ep_rank: int, ep_size: int) -> dict:
    """Load a checkpoint (any layout) into this rank's part of an expert-parallel model.

    For evaluation and tests; training resumes through fairseq's own loader
    (see :func:`load_checkpoint`). Returns the shared state as loaded.
    """
    state = io.read_checkpoint(path)
    reader = io.ShardReader.of(state, path, keep_state=True)
    model.load_state_dict(
        {k: v for k, v in state["model"].items() if fmt.expert_index(k) is None}
        | {k: v for k, v in model.state_dict().items() if fmt.expert_index(k) is not None}
    )
    restore_local_experts(model, reader, reader.info, ep_rank, ep_size)
    return state


# --------------------------------------------------------------------------
# checks


def _check_against_model(
    state: dict, info: Optional[dict], path: str, layout: fmt.ExpertLayout
) -> None:
    """Refuse, with the flag to change, a checkpoint that cannot fit the model just built."""
    if not state.get("model"):
        return
    if upcycle.is_dense_state(state["model"]):
        raise fmt.ExpertCheckpointError(
            f"{path} is a dense checkpoint (no MoE layer) but the model has "
            f"--num-experts {layout.num_experts}: to start an MoE model from it, "
            f"use --upcycle-from {path} (with a new --save-dir)"
        )
    n_ckpt = info["num_experts"] if info else fmt.count_experts(state["model"])
    if n_ckpt and n_ckpt != layout.num_experts:
        raise fmt.ExpertCheckpointError(
            f"{path} has {n_ckpt} experts per MoE layer but the model has "
            f"{layout.num_experts}: use --num-experts {n_ckpt}"
        )
    for key, size in layout.vocab.items():
        if key in state["model"] and state["model"][key].shape[0] != size:
            raise fmt.ExpertCheckpointError(
                f"{path}: {key} has {state['model'][key].shape[0]} rows but the dictionary in "
                f"the data directory has {size} symbols: use the binarized data (dict.*.txt) "
                "the checkpoint was trained with"
            )


def _stop_if_finished(trainer) -> None:
    """A run restarted after reaching ``--max-update`` must not train at all.

    fairseq checks ``--max-update`` only after an update, so restarting a
    finished run (e.g. run.sh's automatic resume) made one more update and
    overwrote the final checkpoint. ``max_epoch = -1`` ends fairseq's epoch
    loop before it starts.
    """
    opt = trainer.cfg.optimization
    if opt.max_update > 0 and trainer.get_num_updates() >= opt.max_update:
        logger.info(
            f"the checkpoint is at {trainer.get_num_updates()} updates, --max-update "
            f"{opt.max_update} is reached: nothing to train"
        )
        opt.max_epoch = -1


# --------------------------------------------------------------------------
# the wrappers


def save_checkpoint(original, cfg, trainer, epoch_itr, val_loss):
    """``checkpoint_utils.save_checkpoint`` that also writes expert shards."""
    task = trainer.task
    layout = getattr(task, "expert_layout", None) if _ours(task) else None
    if layout is None or layout.ep_size <= 1 or cfg.no_save:
        return original(cfg, trainer, epoch_itr, val_loss)
    ep = layout.ep_size
    with_opt = not cfg.no_save_optimizer_state
    info = fmt.shard_info(
        f"u{trainer.get_num_updates()}-{_broadcast_token()}",
        ep,
        layout.num_experts,
        trainer.get_num_updates(),
        optimizer_param_names(trainer) if with_opt else None,
    )
    rank = _dist_rank()
    if rank < ep:  # DeepSpeed's expert-parallel group of rank 0: ranks 0..E-1
        os.makedirs(cfg.save_dir, exist_ok=True)
        io.atomic_save(
            build_shard(trainer, info, rank, with_opt),
            io.shard_file(cfg.save_dir, info["token"], rank, ep),
        )
    _barrier()  # every shard on disk before the shared file names it
    task.pending_expert_shards = info
    try:
        result = original(cfg, trainer, epoch_itr, val_loss)
    finally:
        task.pending_expert_shards = None
    _barrier()
    if rank == 0:
        removed = io.prune_shards(cfg.save_dir, keep=[info["token"]])
        if removed:
            logger.info(f"removed {len(removed)} expert shard(s) no checkpoint names")
    return result


def load_checkpoint_to_cpu(original, path, arg_overrides=None, load_on_all_ranks=False):
    """``checkpoint_utils.load_checkpoint_to_cpu`` that names a damaged file and converts a
    checkpoint of another expert-parallel layout into the running one. A checkpoint
    without expert shards, read outside the task's training, is returned as fairseq
    read it."""
    loading = _LOADING_INTO.get()
    try:
        state = original(path, arg_overrides, load_on_all_ranks)
    except FileNotFoundError:
        raise
    except Exception as e:
        if loading is None and not _unreadable(e):
            raise
        advice = (
            "To go on from an older one, pass it with --restore-file (e.g. an interval "
            "checkpoint checkpoint_<epoch>_<updates>.pt) or move this file away"
            if loading is not None
            else "Use another checkpoint"
        )
        raise fmt.ExpertCheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}): the file is "
            f"truncated or corrupt. {advice}"
        ) from e
    info = (state.get("extra_state") or {}).get(fmt.SHARD_KEY)
    layout = loading.layout if loading is not None else None
    if info is None and layout is None:
        return state  # nothing of this plugin's to convert or check
    running = layout.param_names if layout is not None else None
    reader = io.ShardReader.of(state, path, running)  # checks the shard format version first
    ckpt_ep = reader.info["ep_size"]
    if layout is not None:
        _check_against_model(state, info, path, layout)
        cur_ep = layout.ep_size
    else:
        # nothing built yet (generation, hub): keep the checkpoint's layout if this
        # run's processes can hold it, else consolidate into each process
        world = ds_moe.process_count()
        cur_ep = ckpt_ep if world > 1 and world % ckpt_ep == 0 else 1
    if ckpt_ep == cur_ep:
        if info and cur_ep > 1:
            _attach_reader(state, reader)
        return state
    # another layout: consolidate, then cut rank 0's part of the running one
    full = fmt.gather(state, reader.read_all()) if info else state
    if cur_ep == 1:
        return full
    reader.forget()
    shared, _ = fmt.scatter(full, cur_ep, "resharded", fmt.consolidated_param_names(state, running))
    _attach_reader(shared, reader)
    return shared


def _attach_reader(state: dict, reader: io.ShardReader) -> None:
    """The loaded checkpoint carries the reader of its experts: the model's
    ``load_state_dict`` takes this rank's weights from it, :func:`load_checkpoint`
    their optimizer state (each shard file is read once)."""
    state["model"][fmt.MODEL_KEY] = reader
    state["extra_state"][fmt.SHARD_KEY] = {**state["extra_state"][fmt.SHARD_KEY], "reader": reader}


def load_checkpoint(original, cfg, trainer, **passthrough):
    """``checkpoint_utils.load_checkpoint`` that then gives every rank its experts."""
    task = trainer.task
    if not _ours(task):
        return original(cfg, trainer, **passthrough)
    token = _LOADING_INTO.set(_TrainerLoad(task.expert_layout))
    try:
        extra_state, epoch_itr = original(cfg, trainer, **passthrough)
    finally:
        _LOADING_INTO.reset(token)
    _stop_if_finished(trainer)
    if extra_state is None and task.cfg.upcycle_from:
        upcycle.upcycle_model(trainer.get_model(), task.cfg.upcycle_from)
    info = (extra_state or {}).get(fmt.SHARD_KEY) or {}
    reader = info.get("reader")
    layout = task.expert_layout
    if reader is None or layout is None or layout.ep_size <= 1:
        return extra_state, epoch_itr
    try:
        if not cfg.reset_optimizer:
            rank = ds_moe.expert_parallel_rank(layout.ep_size)
            # the weights were restored by the model's load_state_dict; now their Adam state
            restore_local_experts(
                trainer.get_model(),
                reader,
                reader.info,
                rank,
                layout.ep_size,
                _torch_optimizer(trainer).state,
                weights=False,
            )
            logger.info(
                f"restored expert optimizer state of expert-parallel rank {rank} from "
                f"{reader.source.get('directory') or reader.source.get('consolidated')}"
                f" (token {reader.source.get('token', '-')})"
            )
    finally:
        reader.forget()
    return extra_state, epoch_itr


class AtomicCopyPathManager:
    """fairseq's ``PathManager`` whose ``copy`` of local files is atomic and whose
    ``rename`` is durable.

    fairseq writes a save's first file atomically but then *copies* it to
    ``checkpoint_last.pt`` etc. with a plain copy: a kill during the copy
    leaves a truncated ``checkpoint_last.pt`` that the next run cannot load.
    Its atomic write (``torch_persistent_save``: ``<file>.tmp``, then
    ``PathManager.rename``) fsyncs nothing: after a power loss the renamed file
    could be empty or the rename undone.
    """

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in str(src_path) or "://" in str(dst_path):
            return self._base.copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        io.atomic_copy(src_path, dst_path)
        return True

    def rename(self, src: str, dst: str) -> None:
        if "://" in str(src) or "://" in str(dst):
            return self._base.rename(src, dst)
        io.durable_rename(src, dst)
