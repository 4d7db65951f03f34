# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Checkpoint files: atomic writes and copies, reads, expert shards, pruning.

Every file is written to a temporary name and renamed, so a process killed at
any moment leaves either the previous file or the new one, never half of one;
the file and then its folder are fsynced, so a power loss does not undo a save
either. A killed write leaves its temporary file (full size, possibly): the
next save in that folder removes those of processes that no longer exist.
Shards are written before the shared file that names them; a shard set is
deleted once no shared file in the folder names it (:func:`prune_shards`).

Checkpoints are data, never code: every read goes through
:func:`~.reading.safe_load`, and pruning reads the shard tokens from the pickle's
opcodes, unpickling nothing (:func:`~.reading.shard_token`).
"""

import glob
import logging
import os
import re
import shutil
import socket
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import format as fmt
from .reading import read_error, safe_load, shard_token

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^experts\.([0-9A-Za-z-]+)\.(\d+)-of-(\d+)\.pt$")
_INTERVAL_FILE = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")


def tmp_file(path: str) -> str:
    """The temporary name this process writes ``path`` under before the rename.

    It names the host and the process, so that :func:`remove_dead_tmp_files` can tell
    a killed writer's leftovers from a live writer's file, even in a folder that
    several nodes share.
    """
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_dead_tmp_files(directory: str) -> List[str]:
    """Delete the temporary files (:func:`tmp_file`) in ``directory`` whose writer, a
    process of this host, no longer exists (it was killed mid-write).

    Another host's files are left alone: its processes cannot be checked from here.

    Returns:
        the deleted paths.
    """
    mine = re.compile(rf"^.+\.tmp\.{re.escape(socket.gethostname())}\.(\d+)$")
    removed = []
    for name in os.listdir(directory):
        m = mine.match(name)
        if m and not _alive(int(m.group(1))):
            path = os.path.join(directory, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue  # another rank of this run removed it first
            removed.append(path)
    if removed:
        logger.info(f"removed {len(removed)} temporary file(s) of killed saves in {directory}")
    return removed


def fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (a power loss could undo them otherwise).

    Some file systems refuse to fsync a folder; the rename is then as durable as they
    make it.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: str, path: str) -> None:
    """Rename the complete, fsynced ``tmp`` to ``path`` and fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file of this process, fsync it, rename it to ``path`` and
    fsync the folder; the temp file is gone afterwards whatever happened (and a killed
    writer's is removed by the next write in the folder)."""
    remove_dead_tmp_files(os.path.dirname(os.path.abspath(path)))
    tmp = tmp_file(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temp file and a rename, both fsynced."""

    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    _write_atomically(path, save)


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temp file and a rename, both fsynced."""
    _write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


def durable_rename(src: str, dst: str) -> None:
    """Rename a file someone else wrote (fairseq's ``checkpoint.pt.tmp``) to ``dst``:
    its data fsynced first, the folder after."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    _replace_durably(src, dst)


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """A checkpoint file's contents on the CPU, read by :func:`safe_load`.

    Raises:
        FileNotFoundError: no such file.
        ExpertCheckpointError: one line naming the file: it cannot be read, is damaged,
            would run code (:class:`~.format.UnsafeCheckpointError`) or holds no model.
    """
    try:
        state = safe_load(path, mmap=mmap)
    except (FileNotFoundError, fmt.ExpertCheckpointError):
        raise
    except Exception as e:
        error = read_error(path, e)
        if error is None:
            raise
        raise error from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise fmt.ExpertCheckpointError(
            f"{path} is not a fairseq checkpoint (it holds no model state): give a checkpoint "
            "file that fairseq-train or this plugin wrote"
        )
    return state


def interval_checkpoints(directory: str) -> List[str]:
    """fairseq's interval checkpoints (``checkpoint_<epoch>_<updates>.pt``, kept by
    ``--keep-interval-updates``) in ``directory``, as full paths, most updates first."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        m = _INTERVAL_FILE.match(name)
        if m:
            found.append((int(m.group(2)), os.path.abspath(os.path.join(directory, name))))
    return [path for _, path in sorted(found, reverse=True)]


def suffixed(path: str, suffix: str = "") -> str:
    """The file fairseq reads for ``path`` under ``--checkpoint-suffix`` ``suffix``
    (inserted before ``.pt``)."""
    return path.replace(".pt", suffix + ".pt")


def restore_path(restore_file: str, save_dir: Optional[str], suffix: str = "") -> Optional[str]:
    """The checkpoint ``--restore-file`` names: the file as given (fairseq reads it
    relative to the current directory), else the one in ``save_dir`` (``--save-dir``,
    where the translation_deepspeed task looks too; None: not there); None when neither
    exists. fairseq itself only looks as given, and without a file trains from update 0."""
    for path in (restore_file, os.path.join(save_dir, restore_file) if save_dir else None):
        if path is not None and os.path.isfile(suffixed(path, suffix)):
            return path
    return None


def restore_advice(directory: str, but: Optional[str] = None) -> Optional[str]:
    """``--restore-file`` advice naming the newest interval checkpoint in ``directory``
    (other than ``but``) by its full path; None when there is none."""
    older = [p for p in interval_checkpoints(directory) if p != os.path.abspath(but or "")]
    if older:
        return f"to go on from the newest interval checkpoint there, use --restore-file {older[0]}"
    return None


def shard_file(directory: str, token: str, rank: int, ep_size: int) -> str:
    """Path of expert-parallel rank ``rank``'s shard of checkpoint ``token``."""
    return os.path.join(directory, f"experts.{token}.{rank}-of-{ep_size}.pt")


def read_shard(directory: str, info: dict, rank: int) -> dict:
    """Load and check expert-parallel rank ``rank``'s shard of a checkpoint."""
    path = shard_file(directory, info["token"], rank, info["ep_size"])
    if not os.path.exists(path):
        raise fmt.ExpertCheckpointError(
            f"expert shard {path} is missing: a checkpoint trained with "
            f"--ep-world-size {info['ep_size']} needs all its experts.{info['token']}.*.pt "
            "files next to it (copy them with the checkpoint)"
        )
    shard = read_checkpoint(path)
    fmt.check_shard(shard, info, rank, path)
    return shard


class ShardReader:
    """The experts of one checkpoint, by expert-parallel rank, each file read once.

    A resume needs a rank's shard twice (the model's weights, then the optimizer's
    state): the second read comes from this reader's memory. The reader belongs to
    the loaded checkpoint it was made for and is dropped with it; pickling it (fairseq
    broadcasts a loaded checkpoint to the other ranks) leaves the memory behind.

    Args:
        source: the checkpoint's ``expert_shards`` record plus its ``directory``, or
            ``{"consolidated": path}`` for a file that holds every expert.
        num_experts (int): experts per MoE layer (for a consolidated file).
        running: the running model's parameter names in optimizer order, for the
            optimizer state of a consolidated file that does not record its order.
        loaded: the consolidated file's state, when the caller has read it already.
    """

    def __init__(
        self,
        source: dict,
        num_experts: int,
        running: Optional[Sequence[str]] = None,
        loaded: Optional[dict] = None,
    ):
        self.source = dict(source)
        self._running = running
        self._loaded = loaded
        self._memory: Dict[int, dict] = {}
        if "consolidated" in self.source:
            self.info = {"ep_size": 1, "num_experts": num_experts}
        else:
            fmt.check_version(self.source, "the checkpoint's expert_shards record")
            self.info = self.source

    @classmethod
    def of(
        cls,
        state: dict,
        path: str,
        running: Optional[Sequence[str]] = None,
        keep_state: bool = False,
    ) -> "ShardReader":
        """The reader of the experts of ``state``, the checkpoint read from ``path``: the
        shards beside it (their record's format version checked first), or the file itself
        when it is consolidated (``keep_state``: from ``state``, not read again)."""
        info = (state.get("extra_state") or {}).get(fmt.SHARD_KEY)
        if info is None:
            experts = fmt.count_experts(state.get("model") or {})
            return cls({"consolidated": path}, experts, running, state if keep_state else None)
        fmt.check_version(info, f"{path}'s expert_shards record")
        source = {**info, "directory": os.path.dirname(os.path.abspath(path))}
        return cls(source, info["num_experts"], running)

    def __call__(self, rank: int) -> dict:
        if rank not in self._memory:
            self._memory[rank] = self._read(rank)
        return self._memory[rank]

    def _read(self, rank: int) -> dict:
        if "consolidated" not in self.source:
            return read_shard(self.source["directory"], self.source, rank)
        full = self._loaded
        if full is None:
            full = read_checkpoint(self.source["consolidated"], mmap=True)
        names = fmt.consolidated_param_names(full, self._running)
        return {
            "model": full["model"],
            "optimizer": fmt.optimizer_by_name(full.get("last_optimizer_state"), names),
        }

    def read_all(self) -> List[dict]:
        return [self(r) for r in range(self.info["ep_size"])]

    def forget(self) -> None:
        """Free what was read (the load is done)."""
        self._memory.clear()

    def __getstate__(self):
        return {**self.__dict__, "_memory": {}, "_loaded": None}


def load_consolidated(path: str) -> dict:
    """A checkpoint this plugin wrote, any layout, as one consolidated (EP=1) state.

    Reads the shared file and every expert shard beside it, checking that they belong
    together; a consolidated file is returned as read.

    Raises:
        ExpertCheckpointError: unreadable file, missing or foreign shard.
    """
    state = read_checkpoint(path)
    if fmt.SHARD_KEY not in (state.get("extra_state") or {}):
        return state
    return fmt.gather(state, ShardReader.of(state, path).read_all())


def referenced_tokens(directory: str) -> Optional[set]:
    """Tokens named by the shared checkpoints in ``directory`` (None if one is unreadable)."""
    tokens = set()
    for path in glob.glob(os.path.join(directory, "*.pt")):
        if _SHARD_FILE.match(os.path.basename(path)):
            continue
        try:
            token = shard_token(path)
        except (OSError, ValueError) as e:
            logger.warning(f"not pruning expert shards: cannot read {path} ({e})")
            return None
        if token is not None:
            tokens.add(token)
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
