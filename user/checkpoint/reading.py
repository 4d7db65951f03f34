# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Reading checkpoint files as data, never as code.

A ``.pt`` file is a pickle, and unpickling a pickle can call anything the file names.
:func:`safe_load` (every read of the plugin's, and fairseq's: see ``user/patches.py``)
unpickles tensors, plain containers and :data:`ALLOWED_GLOBALS` only; a file that needs
more is refused in one line unless :data:`TRUST_PICKLE` is set. :func:`shard_token`
reads one string from a checkpoint's pickle opcodes, running none (pruning uses it).
"""

import argparse
import logging
import os
import pickle
import pickletools
import re
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import env_flag
from . import format as fmt

logger = logging.getLogger(__name__)

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
    # --eval-bleu: fairseq's translation task logs BLEU n-gram counts as numpy arrays
    # (tasks/translation.py, reduce_metrics), saved with the metrics in extra_state: int64
    # in one process, float64 once the trainer has summed them over processes as double
    # tensors (_fast_stat_sync_sum); int32 is what numpy 1.x makes of Python ints on Windows
    np.ndarray,
    np.dtype,
    type(np.dtype(np.int64)),
    type(np.dtype(np.int32)),
    type(np.dtype(np.float64)),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),  # numpy >= 2 writes this name
    (_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1.x this one
)

# what torch names when its weights-only unpickler refuses a global or a class
_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>")


def _rewound(f):
    """``f`` itself; a file object back at its start (a path needs nothing)."""
    if hasattr(f, "seek"):
        f.seek(0)
    return f


def _data_pkl(z: zipfile.ZipFile) -> bytes:
    """The pickle of a torch zip checkpoint (``<archive>/data.pkl``; the tensors are
    other records), unread. ``ValueError`` when there is not exactly one."""
    (name,) = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    return z.read(name)


def _name(f) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "checkpoint")


def _unsafe_globals(f, error: Exception) -> List[str]:
    """What a file refused by torch's weights-only unpickler wants beyond the allow-list,
    found without running its pickle: every such global of a zip checkpoint and what
    torch's error names (``[]``: nothing, the file is damaged)."""
    found = {a or b for a, b in _REFUSED.findall(str(error))}
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            found.update(torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(f)))
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
    if mmap and isinstance(f, (str, os.PathLike)) and not zipfile.is_zipfile(f):
        mmap = False  # torch maps zip checkpoints only (a legacy file, or a damaged one)
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
        if not unreadable(e) and _intact(f):
            raise  # not about the file (a bug, a changed signature, memory): as it is
        # a damaged file fails torch's reader in many ways (a KeyError from the
        # unpickler's memo, an IndexError from its stack, a RuntimeError from its zip
        # reader, ...): one kind here
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
    return torch.load(_rewound(f), map_location=map_location, weights_only=False, mmap=mmap)


def _intact(f) -> bool:
    """Whether a file torch failed to read is whole: a zip checkpoint whose members pass
    their CRC check and whose pickle parses, or a file that starts with a pickle (torch's
    legacy format). Parsed by :mod:`pickletools`, which runs nothing."""
    try:
        if zipfile.is_zipfile(_rewound(f)):
            with zipfile.ZipFile(_rewound(f)) as z:
                if z.testzip() is not None:
                    return False
                data = _data_pkl(z)
        elif hasattr(f, "read"):
            data = _rewound(f).read()
        else:
            with open(f, "rb") as fh:
                data = fh.read()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def unreadable(e: BaseException) -> bool:
    """Whether ``e`` is torch failing to read a damaged file (truncated, not a checkpoint):
    what its reader raised for a text file, random bytes, an empty or truncated file."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile)):
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
            f"file is truncated or corrupt (or not a checkpoint){'; ' + advice if advice else ''}"
        )
    return None


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
            data = _data_pkl(z)
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
