# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Files written whole or not at all, and read as lines.

Every output of the pipeline is written under a temporary name and renamed
when complete (``atomic_path``), so a killed run never leaves a truncated
file under a final name; its leftovers are removed by the next run.
"""

import contextlib
import glob
import gzip
import os
import shutil


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Args:
        path: final file or directory path.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    remove_path(tmp)
    _remove_stale_tmp(path)
    try:
        yield tmp
        remove_path(path)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def _remove_stale_tmp(path):
    """Remove ``path.tmp<pid>`` left by a killed run (a process that no longer exists)."""
    for old in glob.glob(glob.escape(path) + ".tmp*"):
        pid = old[len(path) + len(".tmp") :]
        if pid.isdigit() and not _alive(int(pid)):
            remove_path(old)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path):
    """Remove a file, link or directory tree if it exists.

    Args:
        path: the path.
    """
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def read_lines(path):
    """Read a text file (``.gz`` transparently) into a list of lines without newlines.

    Args:
        path: file path.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    # Only "\n" ends a line: str.splitlines would also split on U+2028 and
    # misalign parallel files.
    if lines[-1] == "":
        lines.pop()
    return lines


def write_lines(path, lines):
    """Write lines atomically, one per line.

    Args:
        path: output path.
        lines: iterable of strings without newlines.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")


def count_lines(path):
    """Number of lines of a text file.

    Args:
        path: file path.
    """
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def file_sizes(paths):
    """``{base name: size}`` of files: cheap change detection for a step's inputs.

    Args:
        paths: file paths.
    """
    return {os.path.basename(p): os.path.getsize(p) for p in paths}
