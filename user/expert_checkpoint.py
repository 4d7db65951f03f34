# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Checkpoints of expert-parallel models: one shared file plus one expert shard per
expert-parallel rank.

fairseq writes a checkpoint from rank 0 only. With ``--ep-world-size E > 1``
each of the first ``E`` ranks holds different experts (and their Adam
moments), so a checkpoint is:

* the shared file fairseq writes (``checkpoint_last.pt`` etc.): everything,
  with rank 0's experts, plus ``extra_state["expert_shards"]`` (a token, E, the
  number of experts and the optimizer's parameter order);
* ``experts.<token>.<r>-of-<E>.pt`` next to it, for each expert-parallel rank
  ``r``: that rank's expert weights and optimizer state, named by *global*
  expert index.

Shards are written (atomically: temp file, then rename) before the shared
file, under a token that is new for every save, so the shared file on disk
always names shards that exist and belong to it, even when a save is killed
half-way. The files fairseq copies (``checkpoint_last.pt``,
``checkpoint_best.pt``, ...) share their shards; a shard set is deleted once
no shared file names it, so ``--keep-*`` pruning covers the shards.

Loading goes through :func:`load_checkpoint_to_cpu`: a checkpoint read by a
process whose expert-parallel size differs from the checkpoint's (for example
one process generating from an EP=8 run) is converted on the fly: all shards
gathered (:func:`gather`), then cut to the new layout (:func:`scatter`). After
fairseq has loaded the shared file, :func:`restore_local_experts` gives each
rank its own experts and their optimizer state.

The state layouts are pure functions of names: :func:`gather` and
:func:`scatter` are also what ``python -m user.reshard`` runs.
"""

import contextlib
import copy
import glob
import logging
import os
import re
import secrets
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .upcycle import UpcycleError, is_dense_state, upcycle_state

logger = logging.getLogger(__name__)

SHARD_KEY = "expert_shards"
# Added to a loaded model state dict: where this rank's experts are; the model's
# load_state_dict pops it and restores its own experts from there.
MODEL_KEY = "_expert_shards"
_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")
_SHARD_FILE = re.compile(r"^experts\.([0-9A-Za-z-]+)\.(\d+)-of-(\d+)\.pt$")

# The running process's expert-parallel layout (set when the task builds a
# model): checkpoints of another layout are converted when they are loaded.
_current = {"ep_size": None, "num_experts": None, "param_names": None, "vocab": None}
# True while fairseq's trainer loads a checkpoint into the model just built
# (only then is _current the model the checkpoint goes into).
_training_load = [False]


class ExpertCheckpointError(RuntimeError):
    """A checkpoint whose expert shards are missing, corrupt or do not match."""


# --------------------------------------------------------------------------
# names


def expert_index(name: str) -> Optional[int]:
    """Local (or global) expert index in a parameter name, ``None`` for other names."""
    m = _EXPERT.match(name)
    return int(m.group(2)) if m else None


def shift_expert(name: str, offset: int) -> str:
    """``name`` with its expert index moved by ``offset`` (local <-> global)."""
    m = _EXPERT.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def shard_file(directory: str, token: str, rank: int, ep_size: int) -> str:
    """Path of expert-parallel rank ``rank``'s shard of checkpoint ``token``."""
    return os.path.join(directory, f"experts.{token}.{rank}-of-{ep_size}.pt")


def relayout_names(names: Sequence[str], num_local: int) -> List[str]:
    """Parameter names of the same model with ``num_local`` experts per MoE layer.

    The experts of a layer are contiguous in parameter order (local index 0, 1,
    ...; the same parameters in each), so each layer's block is rebuilt with
    ``num_local`` copies of the expert-0 pattern. Non-expert names keep their
    places.

    Args:
        names: parameter names in optimizer order, experts with local indices.
        num_local (int): experts per layer in the new layout.
    """
    out: List[str] = []
    blocks: Dict[str, List[str]] = {}
    order: List[Tuple[str, str]] = []  # ("name", n) or ("block", prefix)
    for n in names:
        m = _EXPERT.match(n)
        if m is None:
            order.append(("name", n))
            continue
        prefix = m.group(1)
        if prefix not in blocks:
            blocks[prefix] = []
            order.append(("block", prefix))
        if int(m.group(2)) == 0:
            blocks[prefix].append(m.group(3))
    for kind, value in order:
        if kind == "name":
            out.append(value)
        else:
            for i in range(num_local):
                out.extend(f"{value}{i}{suffix}" for suffix in blocks[value])
    return out


# --------------------------------------------------------------------------
# pure state conversions


def _optimizer_by_name(opt_state: dict, names: Sequence[str]) -> Dict[str, dict]:
    """Per-parameter optimizer state keyed by parameter name."""
    groups = opt_state["param_groups"]
    if len(groups) != 1:
        raise ExpertCheckpointError(
            f"optimizer with {len(groups)} parameter groups: expert checkpoints "
            "support fairseq's single parameter group"
        )
    index = groups[0]["params"]
    if len(index) != len(names):
        raise ExpertCheckpointError(
            f"optimizer holds {len(index)} parameters but the checkpoint names "
            f"{len(names)}"
        )
    return {names[k]: opt_state["state"][i] for k, i in enumerate(index) if i in opt_state["state"]}


def _optimizer_from_names(template: dict, by_name: Dict[str, dict], names: Sequence[str]) -> dict:
    """An optimizer state dict over ``names`` (in that order) from per-name states."""
    group = dict(template["param_groups"][0])
    group["params"] = list(range(len(names)))
    state = {i: by_name[n] for i, n in enumerate(names) if n in by_name}
    return {**template, "state": state, "param_groups": [group]}


def _set_ep_size(cfg, ep_size: int) -> None:
    model_cfg = cfg["model"] if cfg is not None else None
    if model_cfg is None:
        return
    try:
        from omegaconf import open_dict

        with open_dict(model_cfg):
            model_cfg["ep_world_size"] = ep_size
    except Exception:  # a plain dict or Namespace
        if isinstance(model_cfg, dict):
            model_cfg["ep_world_size"] = ep_size
        else:
            setattr(model_cfg, "ep_world_size", ep_size)


def gather(state: dict, shards: Sequence[dict]) -> dict:
    """One consolidated (EP=1) checkpoint from a shared file and all its shards.

    Args:
        state: the shared checkpoint (rank 0's experts, ``extra_state["expert_shards"]``).
        shards: every expert-parallel rank's shard, any order.

    Returns:
        a new state dict: every expert under its global index, optimizer state
        re-indexed for the EP=1 parameter order, ``ep_world_size`` 1.
    """
    info = state["extra_state"][SHARD_KEY]
    ep, n = info["ep_size"], info["num_experts"]
    by_rank = {s["ep_rank"]: s for s in shards}
    missing = sorted(set(range(ep)) - set(by_rank))
    if missing:
        raise ExpertCheckpointError(f"expert shards of ranks {missing} (of {ep}) missing")
    out = dict(state)
    model = {k: v for k, v in state["model"].items() if expert_index(k) is None}
    expert_opt: Dict[str, dict] = {}
    for r in range(ep):
        check_shard(by_rank[r], info, r)
        model.update(by_rank[r]["model"])
        expert_opt.update(by_rank[r].get("optimizer", {}))
    out["model"] = model
    opt = state.get("last_optimizer_state")
    if opt is not None and info.get("param_names") is not None:
        by_name = {
            k: v for k, v in _optimizer_by_name(opt, info["param_names"]).items()
            if expert_index(k) is None
        }
        by_name.update(expert_opt)
        out["last_optimizer_state"] = _optimizer_from_names(
            opt, by_name, relayout_names(info["param_names"], n)
        )
    out["extra_state"] = {k: v for k, v in state["extra_state"].items() if k != SHARD_KEY}
    out["extra_state"]["consolidated_from"] = {"ep_size": ep, "token": info["token"]}
    if info.get("param_names"):
        out["extra_state"]["param_names"] = relayout_names(info["param_names"], n)
    out["cfg"] = copy.deepcopy(state["cfg"])
    _set_ep_size(out["cfg"], 1)
    return out


def consolidated_param_names(state: dict) -> Optional[List[str]]:
    """Optimizer parameter order of the consolidated (EP=1) form of ``state``.

    Recorded in checkpoints this plugin writes; for others, derived from the
    running model's parameter names (same architecture, any layout).
    """
    extra = state.get("extra_state") or {}
    info = extra.get(SHARD_KEY)
    n = info["num_experts"] if info else _count_experts(state.get("model") or {})
    if info is not None and info.get("param_names"):
        return relayout_names(info["param_names"], n)
    if extra.get("param_names"):
        return list(extra["param_names"])
    if _current.get("param_names") and n:
        return relayout_names(_current["param_names"], n)
    return None


def scatter(full: dict, ep_size: int, token: str, param_names: Optional[Sequence[str]]
            ) -> Tuple[dict, List[dict]]:
    """Cut a consolidated checkpoint into a shared file and ``ep_size`` shards.

    Args:
        full: consolidated (EP=1) state, every expert under its global index.
        ep_size (int): the new expert-parallel size (divides the number of experts).
        token (str): the new checkpoint's token.
        param_names: the consolidated model's parameter names in optimizer
            order (``None``: the optimizer state is dropped).

    Returns:
        ``(shared, shards)``: rank 0's state with ``extra_state["expert_shards"]``
        and one shard per expert-parallel rank.
    """
    experts = {k: v for k, v in full["model"].items() if expert_index(k) is not None}
    n = 1 + max((expert_index(k) for k in experts), default=-1)
    if n == 0 or n % ep_size:
        raise ExpertCheckpointError(f"{n} experts cannot be split over {ep_size} ranks")
    local = n // ep_size
    opt = full.get("last_optimizer_state")
    by_name = _optimizer_by_name(opt, param_names) if opt is not None and param_names else None
    shards = []
    for r in range(ep_size):
        mine = {k: v for k, v in experts.items() if r * local <= expert_index(k) < (r + 1) * local}
        shard = {"format": "fairseq-moe-expert-shard", "token": token, "ep_rank": r,
                 "ep_size": ep_size, "num_experts": n,
                 "num_updates": _num_updates(full), "model": mine}
        if by_name is not None:
            shard["optimizer"] = {k: by_name[k] for k in mine if k in by_name}
        shards.append(shard)
    shared = dict(full)
    shared["model"] = {k: v for k, v in full["model"].items() if expert_index(k) is None}
    shared["model"].update({k: v for k, v in experts.items() if expert_index(k) < local})
    rank0_names = relayout_names(param_names, local) if param_names else None
    if by_name is not None:
        shared["last_optimizer_state"] = _optimizer_from_names(opt, by_name, rank0_names)
    else:
        shared.pop("last_optimizer_state", None)
    shared["extra_state"] = {k: v for k, v in full["extra_state"].items()
                             if k not in ("consolidated_from", "param_names")}
    shared["extra_state"][SHARD_KEY] = {
        "token": token, "ep_size": ep_size, "num_experts": n,
        "num_updates": _num_updates(full), "param_names": rank0_names,
    }
    shared["cfg"] = copy.deepcopy(full["cfg"])
    _set_ep_size(shared["cfg"], ep_size)
    return shared, shards


def _num_updates(state: dict) -> int:
    hist = state.get("optimizer_history") or [{}]
    return int(hist[-1].get("num_updates", 0))


def check_shard(shard: dict, info: dict, rank: int, path: str = "expert shard") -> None:
    """Raise if ``shard`` does not belong to the shared checkpoint described by ``info``."""
    want = (info["token"], info["ep_size"], rank, info.get("num_updates"))
    got = (shard.get("token"), shard.get("ep_size"), shard.get("ep_rank"), shard.get("num_updates"))
    if want != got:
        raise ExpertCheckpointError(
            f"{path} does not belong to its checkpoint: expected (token, ep_size, "
            f"rank, updates) {want}, found {got}"
        )


# --------------------------------------------------------------------------
# files


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temp file and a rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _torch_load(path: str, mmap: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ExpertCheckpointError(f"cannot read {path}: {e}") from e


#: Shards already read in the current checkpoint load (path -> shard), or None
#: outside one: a resume reads a rank's shard for the model's weights and then
#: for the optimizer's state; the second read comes from here.
_shards_read: List[Optional[dict]] = [None]


@contextlib.contextmanager
def reading_each_shard_once():
    """Within this context, :func:`read_shard` reads a file once; memory is freed after."""
    outer = _shards_read[0]
    if outer is None:
        _shards_read[0] = {}
    try:
        yield
    finally:
        if outer is None:
            _shards_read[0] = None


def read_shard(directory: str, info: dict, rank: int) -> dict:
    """Load and check expert-parallel rank ``rank``'s shard of a checkpoint."""
    path = shard_file(directory, info["token"], rank, info["ep_size"])
    cache = _shards_read[0]
    if cache is not None and path in cache:
        return cache[path]
    if not os.path.exists(path):
        raise ExpertCheckpointError(
            f"expert shard {path} is missing: a checkpoint trained with "
            f"--ep-world-size {info['ep_size']} needs all its experts.{info['token']}.*.pt "
            "files next to it (copy them with the checkpoint)"
        )
    shard = _torch_load(path)
    check_shard(shard, info, rank, path)
    if cache is not None:
        cache[path] = shard
    return shard


def read_all_shards(directory: str, info: dict) -> List[dict]:
    return [read_shard(directory, info, r) for r in range(info["ep_size"])]


def referenced_tokens(directory: str) -> Optional[set]:
    """Tokens named by the shared checkpoints in ``directory`` (None if one is unreadable)."""
    tokens = set()
    for path in glob.glob(os.path.join(directory, "*.pt")):
        if _SHARD_FILE.match(os.path.basename(path)):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:
            logger.warning(f"not pruning expert shards: cannot read {path} ({e})")
            return None
        info = (state.get("extra_state") or {}).get(SHARD_KEY)
        if info:
            tokens.add(info["token"])
    return tokens


def prune_shards(directory: str, keep: Sequence[str] = ()) -> List[str]:
    """Delete expert shards that no shared checkpoint in ``directory`` names.

    Returns:
        the deleted paths.
    """
    tokens = referenced_tokens(directory)
    if tokens is None:
        return []
    tokens.update(keep)
    removed = []
    for path in glob.glob(os.path.join(directory, "experts.*.pt")):
        m = _SHARD_FILE.match(os.path.basename(path))
        if m and m.group(1) not in tokens:
            os.remove(path)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------
# live trainer <-> shards


def _named_params(trainer) -> Dict[int, str]:
    return {id(p): n for n, p in trainer.get_model().named_parameters()}


def _torch_optimizer(trainer):
    opt = trainer.optimizer
    if getattr(opt, "fp32_params", None) is not None:
        raise ExpertCheckpointError(
            "fairseq's FP16Optimizer keeps one fp32 copy of all parameters, so a rank's "
            "expert optimizer state cannot be saved on its own: with --ep-world-size > 1 "
            "use --memory-efficient-fp16 / --memory-efficient-bf16"
        )
    return opt.optimizer


def optimizer_param_names(trainer) -> List[str]:
    """This rank's parameter names in the optimizer's order."""
    names = _named_params(trainer)
    groups = _torch_optimizer(trainer).param_groups
    return [names[id(p)] for g in groups for p in g["params"]]


def local_expert_params(trainer) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of this rank's experts, names with local indices."""
    return [(n, p) for n, p in trainer.get_model().named_parameters() if expert_index(n) is not None]


def build_shard(trainer, token: str, ep_rank: int, ep_size: int, num_experts: int,
                with_optimizer: bool) -> dict:
    """This rank's experts and their optimizer state, named by global expert index."""
    first = ep_rank * (num_experts // ep_size)
    params = local_expert_params(trainer)
    shard = {"format": "fairseq-moe-expert-shard", "token": token, "ep_rank": ep_rank,
             "ep_size": ep_size, "num_experts": num_experts,
             "num_updates": trainer.get_num_updates(),
             "model": {shift_expert(n, first): p.detach().cpu().clone() for n, p in params}}
    if with_optimizer:
        state = _torch_optimizer(trainer).state
        shard["optimizer"] = {
            shift_expert(n, first): {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                     for k, v in state[p].items()}
            for n, p in params if p in state
        }
    return shard


def restore_local_experts(model, shards: Callable[[int], dict], info: dict,
                          ep_rank: int, ep_size: int, opt_state: Optional[dict] = None,
                          weights: bool = True) -> None:
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
    cache: Dict[int, dict] = {}
    for n, p in model.named_parameters():
        if expert_index(n) is None:
            continue
        g = shift_expert(n, first)
        src_rank = expert_index(g) // old_local
        if src_rank not in cache:
            cache[src_rank] = shards(src_rank)
        shard = cache[src_rank]
        if weights:
            with torch.no_grad():
                p.copy_(shard["model"][g].to(p.dtype))
        if opt_state is not None and g in shard.get("optimizer", {}):
            opt_state[p] = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v)
                            for k, v in shard["optimizer"][g].items()}


def load_for_rank(path: str, model, ep_rank: int, ep_size: int) -> dict:
    """Load a checkpoint (any layout) into this rank's part of an expert-parallel model.

    For evaluation and tests; training resumes through fairseq's own loader
    (see :func:`wrap_load_checkpoint`). Returns the shared state as loaded.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    info = state["extra_state"].get(SHARD_KEY)
    if info is None:  # consolidated: the file just read holds every expert
        source, num_experts = {"consolidated": path}, _count_experts(state["model"])
    else:
        source = {**info, "directory": os.path.dirname(os.path.abspath(path))}
        num_experts = info["num_experts"]
    shards, info = shard_reader(source, num_experts, loaded=state)
    model.load_state_dict(
        {k: v for k, v in state["model"].items() if expert_index(k) is None}
        | {k: v for k, v in model.state_dict().items() if expert_index(k) is not None}
    )
    restore_local_experts(model, shards, info, ep_rank, ep_size)
    return state


# --------------------------------------------------------------------------
# fairseq hooks


def set_current_layout(model) -> None:
    """Record the running model's layout (the task calls this when it builds a model):
    expert-parallel size, experts per layer and trainable parameter names in
    the order fairseq's optimizer sees them."""
    opts = model.moe_opts
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    vocab = {f"{side}.embed_tokens.weight": getattr(model, side).embed_tokens.num_embeddings
             for side in ("encoder", "decoder")}
    _current.update(ep_size=opts.ep_size, num_experts=opts.num_experts, param_names=names,
                    vocab=vocab)


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


def wrap_save_checkpoint(original):
    """``checkpoint_utils.save_checkpoint`` that also writes expert shards."""

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        task = trainer.task
        ep = getattr(task, "ep_size", 1)
        if ep <= 1 or cfg.no_save:
            return original(cfg, trainer, epoch_itr, val_loss)
        num_experts = task.num_experts
        updates = trainer.get_num_updates()
        token = f"u{updates}-{_broadcast_token()}"
        rank = _dist_rank()
        with_opt = not cfg.no_save_optimizer_state
        if rank < ep:  # DeepSpeed's expert-parallel group of rank 0: ranks 0..E-1
            os.makedirs(cfg.save_dir, exist_ok=True)
            atomic_save(build_shard(trainer, token, rank, ep, num_experts, with_opt),
                        shard_file(cfg.save_dir, token, rank, ep))
        _barrier()  # every shard on disk before the shared file names it
        task.pending_expert_shards = {
            "token": token, "ep_size": ep, "num_experts": num_experts,
            "num_updates": updates,
            "param_names": optimizer_param_names(trainer) if with_opt else None,
        }
        try:
            result = original(cfg, trainer, epoch_itr, val_loss)
        finally:
            task.pending_expert_shards = None
        _barrier()
        if rank == 0:
            removed = prune_shards(cfg.save_dir, keep=[token])
            if removed:
                logger.info(f"removed {len(removed)} expert shard(s) no checkpoint names")
        return result

    save_checkpoint.wrapped = original
    return save_checkpoint


def wrap_load_checkpoint_to_cpu(original):
    """``checkpoint_utils.load_checkpoint_to_cpu`` that converts a checkpoint of
    another expert-parallel layout into the running one (rank 0's part)."""

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            state = original(path, arg_overrides, load_on_all_ranks)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ExpertCheckpointError(
                f"cannot read checkpoint {path} ({type(e).__name__}: {e}): the file is "
                "truncated or corrupt. To go on from an older one, pass it with "
                "--restore-file (e.g. an interval checkpoint checkpoint_<epoch>_<updates>.pt) "
                "or move this file away"
            ) from e
        extra = state.get("extra_state") or {}
        info = extra.get(SHARD_KEY)
        ckpt_ep = info["ep_size"] if info else 1
        if info:
            info["directory"] = os.path.dirname(os.path.abspath(path))
        if not _training_load[0]:
            cur_ep = None  # generation, hub, tools: the layout follows the processes
        else:
            cur_ep = _current["ep_size"]
            _check_against_model(state, info, path)
        if cur_ep is None:
            # nothing built yet (generation, hub): keep the checkpoint's layout if
            # this run's processes can hold it, else consolidate into each process
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            cur_ep = ckpt_ep if world > 1 and world % ckpt_ep == 0 else 1
        if ckpt_ep == cur_ep:
            if info and cur_ep > 1:
                state["model"][MODEL_KEY] = dict(info)
            return state
        # another layout: consolidate, then cut rank 0's part of the running one
        full = gather(state, read_all_shards(info["directory"], info)) if info else state
        if cur_ep == 1:
            return full
        names = consolidated_param_names(state)
        shared, _ = scatter(full, cur_ep, "resharded", names)
        source = info or {"directory": os.path.dirname(os.path.abspath(path)), "consolidated": path}
        shared["extra_state"][SHARD_KEY]["source"] = source
        shared["model"][MODEL_KEY] = dict(source)
        return shared

    load_checkpoint_to_cpu.wrapped = original
    return load_checkpoint_to_cpu


def _check_against_model(state: dict, info: Optional[dict], path: str) -> None:
    """Refuse, with the flag to change, a checkpoint that cannot fit the model just built."""
    if not _current["num_experts"] or not state.get("model"):
        return
    if is_dense_state(state["model"]):
        raise ExpertCheckpointError(
            f"{path} is a dense checkpoint (no MoE layer) but the model has "
            f"--num-experts {_current['num_experts']}: to start an MoE model from it, "
            f"use --upcycle-from {path} (with a new --save-dir)"
        )
    n_ckpt = info["num_experts"] if info else _count_experts(state["model"])
    if n_ckpt and n_ckpt != _current["num_experts"]:
        raise ExpertCheckpointError(
            f"{path} has {n_ckpt} experts per MoE layer but the model has "
            f"{_current['num_experts']}: use --num-experts {n_ckpt}"
        )
    _check_dictionary(state, path)


def _check_dictionary(state: dict, path: str) -> None:
    """A checkpoint's embedding tables must match the running model's dictionaries."""
    want = _current.get("vocab") or {}
    model = state.get("model") or {}
    for key, size in want.items():
        if key in model and model[key].shape[0] != size:
            raise ExpertCheckpointError(
                f"{path}: {key} has {model[key].shape[0]} rows but the dictionary in the "
                f"data directory has {size} symbols: use the binarized data (dict.*.txt) "
                "the checkpoint was trained with"
            )


def _count_experts(model_state: dict) -> int:
    idx = [expert_index(k) for k in model_state]
    idx = [i for i in idx if i is not None]
    return 1 + max(idx) if idx else 0


def shard_reader(source: dict, num_experts: int, names: Callable[[], List[str]] = lambda: None,
                 loaded: Optional[dict] = None):
    """``(rank -> shard, layout info)`` for the checkpoint ``source`` describes: a
    shared file's ``expert_shards`` (with ``directory``) or ``{"consolidated": path}``.

    Args:
        names: gives the consolidated parameter order, when a consolidated file
            does not record it (for its optimizer state).
        loaded: the consolidated file's state, when the caller has read it already.
    """
    if "consolidated" not in source:
        return (lambda r: read_shard(source["directory"], source, r)), source
    cache: dict = {}

    def whole(_r):
        if not cache:
            full = loaded if loaded is not None else _torch_load(source["consolidated"], mmap=True)
            opt = full.get("last_optimizer_state")
            order = consolidated_param_names(full) or names()
            cache["model"] = full["model"]
            cache["optimizer"] = _optimizer_by_name(opt, order) if opt is not None and order else {}
        return cache

    return whole, {"ep_size": 1, "num_experts": num_experts}


def restore_model_experts(model, source: dict) -> None:
    """Give this rank's part of an expert-parallel model its own experts (the
    model's ``load_state_dict`` calls this with the :data:`MODEL_KEY` entry)."""
    ep = model.moe_opts.ep_size
    if ep <= 1:
        return
    shards, info = shard_reader(source, model.moe_opts.num_experts)
    restore_local_experts(model, shards, info, _dist_rank() % ep, ep)


def wrap_load_checkpoint(original):
    """``checkpoint_utils.load_checkpoint`` that then gives every rank its experts."""

    def load_checkpoint(cfg, trainer, **passthrough):
        with reading_each_shard_once():
            return _load(cfg, trainer, **passthrough)

    def _load(cfg, trainer, **passthrough):
        _training_load[0] = True
        try:
            extra_state, epoch_itr = original(cfg, trainer, **passthrough)
        finally:
            _training_load[0] = False
        task = trainer.task
        _stop_if_finished(trainer)
        dense = getattr(getattr(task, "cfg", None), "upcycle_from", None)
        if extra_state is None and dense:
            _upcycle(trainer.get_model(), dense)
        info = (extra_state or {}).get(SHARD_KEY)
        ep = getattr(task, "ep_size", 1)
        if info is None or ep <= 1:
            return extra_state, epoch_itr
        if cfg.reset_optimizer:
            return extra_state, epoch_itr
        source = info.get("source", info)
        rank = _dist_rank() % ep
        shards, src_info = shard_reader(source, task.num_experts, lambda: relayout_names(
            optimizer_param_names(trainer), task.num_experts))
        # the weights were restored by the model's load_state_dict; now their Adam state
        restore_local_experts(trainer.get_model(), shards, src_info, rank, ep,
                              _torch_optimizer(trainer).state, weights=False)
        logger.info(f"restored expert optimizer state of expert-parallel rank {rank} from "
                    f"{source.get('directory')} (token {source.get('token', '-')})")
        return extra_state, epoch_itr

    load_checkpoint.wrapped = original
    return load_checkpoint


def _stop_if_finished(trainer) -> None:
    """A run restarted after reaching ``--max-update`` must not train at all.

    fairseq checks ``--max-update`` only after an update, so restarting a
    finished run (e.g. run.sh's automatic resume) made one more update and
    overwrote the final checkpoint. ``max_epoch = -1`` ends fairseq's epoch
    loop before it starts.
    """
    opt = trainer.cfg.optimization
    if opt.max_update > 0 and trainer.get_num_updates() >= opt.max_update:
        logger.info(f"the checkpoint is at {trainer.get_num_updates()} updates, --max-update "
                    f"{opt.max_update} is reached: nothing to train")
        opt.max_epoch = -1


def _upcycle(model, path: str) -> None:
    dense = torch.load(path, map_location="cpu", weights_only=False)
    if not is_dense_state(dense["model"]):
        raise UpcycleError(f"--upcycle-from {path}: this checkpoint already has MoE layers")
    state, fresh = upcycle_state(dense["model"], model.state_dict())
    model.load_state_dict(state)
    logger.info(f"upcycled from dense checkpoint {path}: experts copy its FFNs, "
                f"{len(fresh)} router tensors start fresh")


class _AtomicCopyPathManager:
    """fairseq's ``PathManager`` whose ``copy`` of local files is atomic.

    fairseq writes a save's first file atomically but then *copies* it to
    ``checkpoint_last.pt`` etc. with a plain copy: a kill during the copy
    leaves a truncated ``checkpoint_last.pt`` that the next run cannot load.
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
        tmp = f"{dst_path}.tmp.{os.getpid()}"
        try:
            shutil.copyfile(src_path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dst_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True


def install() -> None:
    """Wrap fairseq's checkpoint functions once (idempotent)."""
    from fairseq import checkpoint_utils as cu

    if not isinstance(cu.PathManager, _AtomicCopyPathManager):
        cu.PathManager = _AtomicCopyPathManager(cu.PathManager)
    if not hasattr(cu.save_checkpoint, "wrapped"):
        cu.save_checkpoint = wrap_save_checkpoint(cu.save_checkpoint)
    if not hasattr(cu.load_checkpoint, "wrapped"):
        cu.load_checkpoint = wrap_load_checkpoint(cu.load_checkpoint)
    if not hasattr(cu.load_checkpoint_to_cpu, "wrapped"):
        cu.load_checkpoint_to_cpu = wrap_load_checkpoint_to_cpu(cu.load_checkpoint_to_cpu)
