# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""What an expert-parallel checkpoint holds: pure functions of state dicts, no files.

A checkpoint of a run with ``--ep-world-size E > 1`` is

* the *shared file* fairseq writes (``checkpoint_last.pt`` etc.): everything, with
  expert-parallel rank 0's experts under local names, plus
  ``extra_state["expert_shards"]`` (:func:`shard_info`);
* one *expert shard* per expert-parallel rank ``r`` (:func:`make_shard`): that rank's
  expert weights and their optimizer state, named by *global* expert index.

A *consolidated* checkpoint (``E = 1``) holds every expert in one file.
:func:`gather` and :func:`scatter` convert between the two; parameter names carry the
expert index (``...deepspeed_experts.<i>.fc1.weight``), so the conversions are
renamings and re-indexings of the optimizer state, nothing else.

Every shard and every ``expert_shards`` record carries :data:`FORMAT_VERSION`; a
file written by a newer version is refused with one clear line.
"""

import copy
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import PluginError

SHARD_KEY = "expert_shards"
# Entry added to a loaded model state dict: where an expert-parallel rank finds its
# experts. The model's ``load_state_dict`` pops it (see restore_model_experts).
MODEL_KEY = "_expert_shards"
FORMAT = "fairseq-moe-expert-shard"
#: Version 1: the layout above. Files written before versions were recorded are 1.
FORMAT_VERSION = 1

_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")


class ExpertCheckpointError(PluginError, RuntimeError):
    """A checkpoint that cannot be read, or whose expert shards are missing, corrupt or
    do not match."""


class UnsafeCheckpointError(ExpertCheckpointError):
    """A checkpoint whose unpickling would call more than a checkpoint's data needs."""


@dataclass(frozen=True)
class ExpertLayout:
    """How the running MoE model holds its experts (owned by the task that built it).

    Args:
        ep_size (int): expert-parallel size (``--ep-world-size``).
        num_experts (int): experts per MoE layer, all ranks together.
        param_names (tuple of str): trainable parameter names in the optimizer's order.
        vocab (dict): embedding table name -> dictionary size, to catch a checkpoint
            trained on other data.
    """

    ep_size: int
    num_experts: int
    param_names: Tuple[str, ...]
    vocab: Dict[str, int]

    @classmethod
    def of(cls, model) -> "ExpertLayout":
        opts = model.moe_opts
        vocab = {
            f"{side}.embed_tokens.weight": getattr(model, side).embed_tokens.num_embeddings
            for side in ("encoder", "decoder")
        }
        names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        return cls(opts.ep_size, opts.num_experts, names, vocab)


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


def count_experts(model_state: dict) -> int:
    """Experts per MoE layer in a model state dict (0 for a dense one)."""
    idx = [i for i in map(expert_index, model_state) if i is not None]
    return 1 + max(idx) if idx else 0


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
# the records


def num_updates(state: dict) -> int:
    """Updates recorded in a fairseq checkpoint."""
    hist = state.get("optimizer_history") or [{}]
    return int(hist[-1].get("num_updates", 0))


def shard_info(
    token: str, ep_size: int, num_experts: int, updates: int, param_names: Optional[Sequence[str]]
) -> dict:
    """The shared file's ``extra_state["expert_shards"]``: which shards belong to it.

    Args:
        token (str): unique to one save; part of every shard's file name.
        ep_size (int): expert-parallel size (number of shards).
        num_experts (int): experts per MoE layer.
        updates (int): the save's update count (every shard records it too).
        param_names: expert-parallel rank 0's parameter names in optimizer order
            (``None`` when no optimizer state was saved).
    """
    return {
        "version": FORMAT_VERSION,
        "token": token,
        "ep_size": ep_size,
        "num_experts": num_experts,
        "num_updates": updates,
        "param_names": list(param_names) if param_names is not None else None,
    }


def make_shard(
    info: dict, ep_rank: int, model: Dict[str, object], optimizer: Optional[Dict[str, dict]]
) -> dict:
    """Expert-parallel rank ``ep_rank``'s shard of the checkpoint ``info`` describes.

    Args:
        info: the shared file's :func:`shard_info`.
        ep_rank (int): the rank whose experts these are.
        model: global expert parameter name -> tensor.
        optimizer: global expert parameter name -> its optimizer state, or ``None``.
    """
    shard = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "token": info["token"],
        "ep_rank": ep_rank,
        "ep_size": info["ep_size"],
        "num_experts": info["num_experts"],
        "num_updates": info["num_updates"],
        "model": model,
    }
    if optimizer is not None:
        shard["optimizer"] = optimizer
    return shard


def check_version(record: dict, what: str) -> None:
    """Refuse a shard or ``expert_shards`` record written in a newer format."""
    version = record.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExpertCheckpointError(
            f"{what} is in expert-shard format {version!r}, newer than this plugin reads "
            f"({FORMAT_VERSION}): update the plugin to load it"
        )


def check_shard(shard: dict, info: dict, rank: int, path: str = "expert shard") -> None:
    """Raise if ``shard`` does not belong to the shared checkpoint described by ``info``."""
    if not isinstance(shard, dict) or shard.get("format") != FORMAT:
        raise ExpertCheckpointError(f"{path} is not an expert shard of this plugin")
    check_version(shard, path)
    want = (info["token"], info["ep_size"], rank, info.get("num_updates"))
    got = (shard.get("token"), shard.get("ep_size"), shard.get("ep_rank"), shard.get("num_updates"))
    if want != got:
        raise ExpertCheckpointError(
            f"{path} does not belong to its checkpoint: expected (token, ep_size, "
            f"rank, updates) {want}, found {got}"
        )


# --------------------------------------------------------------------------
# conversions


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
            f"optimizer holds {len(index)} parameters but the checkpoint names {len(names)}"
        )
    return {names[k]: opt_state["state"][i] for k, i in enumerate(index) if i in opt_state["state"]}


def optimizer_by_name(opt_state: Optional[dict], names: Optional[Sequence[str]]) -> Dict[str, dict]:
    """:func:`_optimizer_by_name`, or ``{}`` without optimizer state or names."""
    return _optimizer_by_name(opt_state, names) if opt_state is not None and names else {}


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
            model_cfg.ep_world_size = ep_size


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
    check_version(info, "the checkpoint's expert_shards record")
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
            k: v
            for k, v in _optimizer_by_name(opt, info["param_names"]).items()
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


def consolidated_param_names(
    state: dict, running: Optional[Sequence[str]] = None
) -> Optional[List[str]]:
    """Optimizer parameter order of the consolidated (EP=1) form of ``state``.

    Recorded in checkpoints this plugin writes; for others, derived from
    ``running``, the running model's parameter names (same architecture, any layout).
    """
    extra = state.get("extra_state") or {}
    info = extra.get(SHARD_KEY)
    n = info["num_experts"] if info else count_experts(state.get("model") or {})
    if info is not None and info.get("param_names"):
        return relayout_names(info["param_names"], n)
    if extra.get("param_names"):
        return list(extra["param_names"])
    if running and n:
        return relayout_names(running, n)
    return None


def scatter(
    full: dict, ep_size: int, token: str, param_names: Optional[Sequence[str]]
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
    rank0_names = relayout_names(param_names, local) if param_names else None
    info = shard_info(token, ep_size, n, num_updates(full), rank0_names)
    shards = []
    for r in range(ep_size):
        mine = {k: v for k, v in experts.items() if r * local <= expert_index(k) < (r + 1) * local}
        optimizer = {k: by_name[k] for k in mine if k in by_name} if by_name is not None else None
        shards.append(make_shard(info, r, mine, optimizer))
    shared = dict(full)
    shared["model"] = {k: v for k, v in full["model"].items() if expert_index(k) is None}
    shared["model"].update({k: v for k, v in experts.items() if expert_index(k) < local})
    if by_name is not None:
        shared["last_optimizer_state"] = _optimizer_from_names(opt, by_name, rank0_names)
    else:
        shared.pop("last_optimizer_state", None)
    shared["extra_state"] = {
        k: v
        for k, v in full["extra_state"].items()
        if k not in ("consolidated_from", "param_names")
    }
    shared["extra_state"][SHARD_KEY] = info
    shared["cfg"] = copy.deepcopy(full["cfg"])
    _set_ep_size(shared["cfg"], ep_size)
    return shared, shards
