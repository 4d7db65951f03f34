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

Checkpoints are data, never code: every read goes through :func:`safe_load`
(fairseq's too, see ``user/patches.py``), which unpickles tensors, plain
containers and :data:`ALLOWED_GLOBALS` only. Pruning reads the shard tokens from
the pickle's opcodes and unpickles nothing (:func:`shard_token`).
"""

import argparse
import glob
import logging
import os
import pickle
import pickletools
import re
import shutil
import socket
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import env_flag
from . import format as fmt

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^experts\.([0-9A-Za-z-]+)\.(\d+)-of-(\d+)\.pt$")
_INTERVAL_FILE = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")

#: Set to 1 to load a checkpoint that needs more than :data:`ALLOWED_GLOBALS` with full
#: pickle, which lets the file run code: for old files from a source you trust.
TRUST_PICKLE = "FAIRSEQ_MOE_TRUST_PICKLE"

_reconstruct = np.zeros(0).__reduce__()[0]  # what an unpickled numpy array is made by

#: What fairseq checkpoints hold beyond tensors and plain containers (which torch's
#: weights-only unpickler allows by default). Each entry only rebuilds data.
ALLOWED_GLOBALS = (
    # the model's config: fairseq keeps a legacy (argparse) model's in cfg["model"]
    # (fairseq >= 0.10, this plugin's models), older checkpoints the whole config in "args"
    argparse.Namespace,
    # --eval-bleu: fairseq's translation task logs BLEU n-gram counts as numpy int
    # arrays (tasks/translation.py, reduce_metrics), saved with the metrics in extra_state;
    # int32 is what numpy 1.x makes of Python ints on Windows
    np.ndarray,
    np.dtype,
    type(np.dtype(np.int64)),
    type(np.dtype(np.int32)),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),  # numpy >= 2 writes this name
    (_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1.x this one
)

# what torch names when its weights-only unpickler refuses a global or a class
_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>")


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


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temp file and a rename, both fsynced."""
    remove_dead_tmp_files(os.path.dirname(os.path.abspath(path)))
    tmp = tmp_file(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temp file and a rename, both fsynced."""
    remove_dead_tmp_files(os.path.dirname(os.path.abspath(dst)))
    tmp = tmp_file(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _replace_durably(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def durable_rename(src: str, dst: str) -> None:
    """Rename a file someone else wrote (fairseq's ``checkpoint.pt.tmp``) to ``dst``:
    its data fsynced first, the folder after."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    _replace_durably(src, dst)


def _name(f) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "checkpoint")


def _unsafe_globals(f, error: Exception) -> List[str]:
    """What a file refused by torch's weights-only unpickler wants beyond the allow-list,
    found without running its pickle: every such global of a zip checkpoint and what
    torch's error names (``[]``: nothing, the file is damaged)."""
    found = {a or b for a, b in _REFUSED.findall(str(error))}
    try:
        if hasattr(f, "seek"):
            f.seek(0)
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            found.update(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:  # not a zip checkpoint, or damaged: torch's error says all we know
        pass
    return sorted(found)


def safe_load(f, map_location="cpu", mmap: bool = False):
    """``torch.load`` that never runs code from the file: tensors, plain containers and
    :data:`ALLOWED_GLOBALS` only (torch's ``weights_only`` with that allow-list).

    Args:
        f: a path, or a binary file open at its start (fairseq passes one).
        map_location, mmap: as ``torch.load``'s.

    Raises:
        UnsafeCheckpointError: the file needs more; with :data:`TRUST_PICKLE` set it is
            loaded with full pickle instead, and a warning says so.
        OSError: the system refused the file.
        pickle.UnpicklingError: a damaged file.
    """
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        wanted = _unsafe_globals(f, e)
        if not wanted:
            raise  # damaged
        refusal = e
    except Exception as e:
        # a damaged file fails torch's reader in many ways (a KeyError from the
        # unpickler's memo, a RuntimeError from its zip reader, ...): one kind here
        raise pickle.UnpicklingError(f"{type(e).__name__}: {_reason(e)}") from e
    calls = ", ".join(wanted)
    if not env_flag(TRUST_PICKLE, False):
        raise fmt.UnsafeCheckpointError(
            f"{_name(f)} is not plain checkpoint data: unpickling it would call {calls}, "
            "and such a file can run any code on this machine. If you trust where it "
            f"comes from (e.g. an old fairseq checkpoint), set {TRUST_PICKLE}=1 to load it "
            "with full pickle"
        ) from refusal
    logger.warning(
        f"{TRUST_PICKLE}=1: loading {_name(f)} with full pickle although it calls "
        f"{calls}: a file from a source you do not trust can run any code on this machine"
    )
    if hasattr(f, "seek"):
        f.seek(0)
    return torch.load(f, map_location=map_location, weights_only=False, mmap=mmap)


def unreadable(e: BaseException) -> bool:
    """Whether ``e`` is torch failing to read a damaged file (truncated, not a checkpoint)."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return True
    return isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)


def _reason(e: BaseException) -> str:
    """torch's error in one line (a weights-only error wraps its reason in advice)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(text.split())


def read_error(path: str, e: BaseException, advice: str = "") -> Optional[Exception]:
    """The one-line error for checkpoint ``path`` that ``e`` kept from being read: the
    system refused it (permission denied, a directory) or the file is damaged. ``None``
    for any other error: a bug or a changed signature, which must propagate as it is."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return fmt.ExpertCheckpointError(f"cannot read {path}: {(e.strerror or str(e)).lower()}")
    if unreadable(e):
        cause = e.__cause__ or e  # what torch's reader raised (see safe_load)
        return fmt.ExpertCheckpointError(
            f"cannot read checkpoint {path} ({type(cause).__name__}: {_reason(cause)}): the "
            f"file is truncated or corrupt (or not a checkpoint){'. ' + advice if advice else ''}"
        )
    return None


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


def restore_path(restore_file: str, save_dir: str, suffix: str = "") -> Optional[str]:
    """The checkpoint ``--restore-file`` names: the file as given (fairseq reads it
    relative to the current directory), else the one in ``--save-dir``; None when
    neither exists. fairseq itself only looks as given, and without a file trains from
    update 0. ``suffix``: ``--checkpoint-suffix``, which fairseq inserts before ``.pt``."""
    for path in (restore_file, os.path.join(save_dir, restore_file)):
        if os.path.isfile(path.replace(".pt", suffix + ".pt")):
            return path
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


_STRINGS = ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")  # a Python str
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")


def _pickle_values(data: bytes) -> Iterator[Tuple[pickletools.OpcodeInfo, Optional[str]]]:
    """``(opcode, string)`` for each opcode of a pickle, read by :func:`pickletools.genops`,
    which runs nothing: the string pushed (directly or from the memo), else ``None``.
    Memo stores and framing are left out."""
    memo: Dict[int, Optional[str]] = {}
    last: Optional[str] = None
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_PUTS or op.name == "MEMOIZE":
            memo[arg if op.name in _MEMO_PUTS else len(memo)] = last
        elif op.name not in ("PROTO", "FRAME"):
            last = arg if op.name in _STRINGS else memo.get(arg) if op.name in _MEMO_GETS else None
            yield op, last


def _record_token(values: Iterator[Tuple[pickletools.OpcodeInfo, Optional[str]]]) -> str:
    """The ``token`` of the ``expert_shards`` dict whose opcodes ``values`` go on with."""
    depth, before = 0, None  # marks open inside the record
    for op, value in values:
        if before == "token" and value is not None and depth <= 1:
            return value
        if op.name == "MARK":
            depth += 1
        elif pickletools.markobject in op.stack_before:
            depth -= 1
        if depth <= 0 and op.name in ("SETITEM", "SETITEMS"):
            break  # the record is closed
        before = value
    raise ValueError(f"its {fmt.SHARD_KEY} record names no token")


def shard_token(path: str) -> Optional[str]:
    """The token of the expert shards the shared checkpoint ``path`` names (``None``:
    none), read from the opcodes of its pickle: nothing of the file is unpickled.

    Raises:
        ValueError: not a torch zip checkpoint, or damaged.
    """
    try:
        with zipfile.ZipFile(path) as z:
            (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            data = z.read(pkl)
    except (zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"not a torch checkpoint: {e}") from e
    values = _pickle_values(data)
    for _, value in values:
        if value == fmt.SHARD_KEY:
            following = next(values, (None, None))[0]
            if following is not None and following.name == "EMPTY_DICT":
                return _record_token(values)
            if following is None or following.name != "NONE":
                # the record shared with another entry, or not a dict: keep every shard
                raise ValueError(f"its {fmt.SHARD_KEY} entry is not a plain record")
    return None


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
