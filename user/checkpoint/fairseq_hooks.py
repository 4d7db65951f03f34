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
  names the file and the way back; in the trainer's load, a checkpoint saved with
  other model flags is refused naming them; a checkpoint of another expert-parallel
  layout is converted (gathered, and cut to the running layout).

fairseq's trainer calls ``load_checkpoint_to_cpu`` without the task, so
:func:`load_checkpoint` hands the task's :class:`~.format.ExpertLayout` down through
a context variable set for the duration of that one call.
"""

import contextvars
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from .. import ds_moe
from ..errors import PluginError
from ..moe_options import FLAGS, parse_sides
from . import format as fmt
from . import io, reading, upcycle

logger = logging.getLogger(__name__)

# Set while the translation_deepspeed task's trainer loads a checkpoint: a _TrainerLoad
# with the layout of the model just built (None for a dense one). Unset outside such a
# load (generation, hub, tools: the layout then follows the processes).
_LOADING_INTO: contextvars.ContextVar = contextvars.ContextVar("moe_loading_into", default=None)


@dataclass(frozen=True)
class _TrainerLoad:
    """What the trainer's load knows of the model just built.

    Args:
        layout: its :class:`~.format.ExpertLayout` (``None`` for a dense model).
        model_cfg: its model config (``cfg.model``: an ``argparse.Namespace`` for the
            plugin's models), to compare with the checkpoint's.
    """

    layout: Optional[fmt.ExpertLayout]
    model_cfg: Any = None


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


# The model flags that decide which parameters the model has, their shapes and where
# its experts sit: a checkpoint saved with other values does not fit (fairseq stops in
# load_state_dict with a traceback) or would silently compute something else. The MoE
# ones count only when both models have MoE layers (--deepspeed_moe names the change).
_MODEL_FLAGS = (
    "arch",
    "deepspeed_moe",
    "num_experts",
    "moe_freq",
    "moe_use_residual",
    "encoder_layers",
    "decoder_layers",
    "encoder_embed_dim",
    "decoder_embed_dim",
    "decoder_input_dim",
    "decoder_output_dim",
    "encoder_ffn_embed_dim",
    "decoder_ffn_embed_dim",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "share_all_embeddings",
    "share_decoder_input_output_embed",
)
_MOE_ONLY = ("num_experts", "moe_freq", "moe_use_residual")


def _flag(dest: str) -> str:
    """The command-line flag of a model config field."""
    return next((f.names[0] for f in FLAGS if f.dest == dest), "--" + dest.replace("_", "-"))


def _twin(arch):
    """fairseq's architecture that ``arch`` (a ``transformer_ds_moe_*``) is the MoE twin
    of: without ``--deepspeed_moe`` they have the same parameters."""
    return arch.replace("transformer_ds_moe", "transformer", 1) if isinstance(arch, str) else arch


def _model_value(cfg, dest: str):
    """A model config field (``None`` when absent) of a Namespace, dict or DictConfig."""
    value = cfg.get(dest, None) if hasattr(cfg, "get") else getattr(cfg, dest, None)
    if dest == "deepspeed_moe":  # "dec,enc" is "enc,dec"; "" is dense, as not given
        return ",".join(sorted(parse_sides(value))) or None
    return value


def _check_model_flags(state: dict, path: str, model_cfg) -> None:
    """Refuse a checkpoint saved with other :data:`_MODEL_FLAGS`, naming each with both values."""
    saved = state["cfg"].get("model") if state.get("cfg") is not None else state.get("args")
    if saved is None or model_cfg is None:
        return
    moe = _model_value(saved, "deepspeed_moe") and _model_value(model_cfg, "deepspeed_moe")
    differ = []
    for dest in _MODEL_FLAGS:
        here, there = _model_value(model_cfg, dest), _model_value(saved, dest)
        if (dest in _MOE_ONLY and not moe) or (dest != "deepspeed_moe" and there is None):
            continue  # no MoE on one side, or a flag the checkpoint does not record
        if here != there and not (dest == "arch" and _twin(here) == _twin(there)):
            differ.append((_flag(dest), here, there))
    if not differ:
        return

    def shown(v):
        if isinstance(v, bool):
            return "on" if v else "off"
        return "not given" if v is None else v

    what = ", ".join(
        f"{flag} is {shown(here)} here but {shown(there)}" for flag, here, there in differ
    )
    use = [flag if there is True else f"{flag} {there}" for flag, _, there in differ if there]
    drop = [flag for flag, _, there in differ if not there]
    fix = " and ".join(
        part
        for part in (use and "use " + " ".join(use), drop and "leave out " + " ".join(drop))
        if part
    )
    raise fmt.ExpertCheckpointError(f"{what} in {path}: {fix} (or a new --save-dir)")


def _check_layout(state: dict, info: Optional[dict], path: str, layout: fmt.ExpertLayout) -> None:
    """Refuse, with the flag to change, a checkpoint whose experts or vocabulary do not fit."""
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


def _check_against_model(state: dict, info: Optional[dict], path: str, load: _TrainerLoad) -> None:
    """Refuse, with the flags to change, a checkpoint that cannot fit the model just built:
    its experts and vocabulary first (an MoE model), then the model flags it was saved with."""
    if not state.get("model"):
        return
    if load.layout is not None:
        _check_layout(state, info, path, load.layout)
    _check_model_flags(state, path, load.model_cfg)


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
    """``checkpoint_utils.load_checkpoint_to_cpu`` that names a file it cannot read (damaged,
    or refused by the system: other errors pass as they are), checks the checkpoint against
    the model the trainer just built, and converts a checkpoint of another expert-parallel
    layout into the running one. A checkpoint without expert shards, read outside the
    task's training, is returned as fairseq read it."""
    loading = _LOADING_INTO.get()
    try:
        state = original(path, arg_overrides, load_on_all_ranks)
    except (FileNotFoundError, PluginError):
        raise
    except Exception as e:
        advice = (
            (
                io.restore_advice(os.path.dirname(path) or ".", but=path)
                or "to go on from an older one, pass it with --restore-file (e.g. an "
                "interval checkpoint checkpoint_<epoch>_<updates>.pt)"
            )
            + " or move this file away"
            if loading is not None
            else "use another checkpoint"
        )
        error = reading.read_error(path, e, advice)
        if error is None:
            raise  # not about the file (a bug, a changed signature): as it is
        raise error from e
    info = (state.get("extra_state") or {}).get(fmt.SHARD_KEY)
    layout = loading.layout if loading is not None else None
    running = layout.param_names if layout is not None else None
    reader = None
    if info is not None or layout is not None:
        reader = io.ShardReader.of(state, path, running)  # checks the shard format version first
    if loading is not None:
        _check_against_model(state, info, path, loading)
    if reader is None:
        return state  # nothing of this plugin's to convert
    ckpt_ep = reader.info["ep_size"]
    if layout is not None:
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
    if cfg.restore_file != "checkpoint_last.pt":
        # fairseq reads --restore-file as given only; one that exists only in --save-dir
        # (as the advice on a corrupt checkpoint names it) is the one meant
        # (one that exists nowhere is refused with the flags: moe_options)
        found = io.restore_path(cfg.restore_file, cfg.save_dir, cfg.checkpoint_suffix or "")
        if found is not None and found != cfg.restore_file:
            logger.info(f"--restore-file {cfg.restore_file}: loading {os.path.abspath(found)}")
            cfg.restore_file = os.path.abspath(found)
    token = _LOADING_INTO.set(_TrainerLoad(task.expert_layout, trainer.cfg.model))
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
