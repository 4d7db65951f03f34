#!/usr/bin/env python3
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``user/train.py`` that kills itself (SIGKILL) at a chosen point, for
scripts/fault_run.py. Not part of the plugin.

Environment:
    FAULT_MODE    forward | between | save | copy | shard | none
    FAULT_UPDATE  the update at which to strike: ``forward`` kills during the
                  forward pass of that update; ``between`` right after it (made,
                  not yet logged or saved); ``save`` half-way through
                  fairseq's own write of the shared checkpoint of that update
                  (its bytes, written by torch.save); ``copy`` half-way through
                  the first copy of a checkpoint to its other names
                  (checkpoint_last.pt) from that update on; ``shard``
                  (expert parallel) half-way through the write of this rank's
                  expert shard of that update (its bytes, written by torch.save)
    FAULT_RANK    which rank strikes [0]
"""

import io
import os
import signal
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODE = os.environ.get("FAULT_MODE", "none")
UPDATE = int(os.environ.get("FAULT_UPDATE", "0"))
RANK = int(os.environ.get("FAULT_RANK", "0"))


def _die(half_written=None):
    if half_written is not None:
        with open(half_written, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)


class _DiesHalfWay:
    """A file whose writer is SIGKILLed once ``half`` bytes are in it."""

    def __init__(self, f, half: int):
        self.f, self.left = f, half

    def write(self, data) -> int:
        if len(data) >= self.left:
            self.f.write(bytes(data[: self.left]))
            self.f.flush()  # (the page cache outlives the process: what a kill leaves)
            _die()
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _die_half_way_through(write, obj, *args, **kwargs):
    """``write(obj, *args, **kwargs)``, which writes ``obj`` to a file with ``torch.save``, killed by
    SIGKILL half-way through the bytes of that file (the real write, not a stand-in)."""
    import torch

    save = torch.save
    whole = io.BytesIO()
    save(obj, whole)
    half = len(whole.getvalue()) // 2

    def dying_save(o, f, *a, **kw):
        return save(o, _DiesHalfWay(f, half) if o is obj else f, *a, **kw)

    torch.save = dying_save
    try:
        return write(obj, *args, **kwargs)
    finally:
        torch.save = save


def _mine() -> bool:
    return int(os.environ.get("RANK", "0")) == RANK


def install(state):
    """Patch the fault point; ``state["updates"]`` tracks the trainer's updates."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    from user.checkpoint import io as ckpt_io

    train_step = Trainer.train_step

    def counted_train_step(self, samples, *a, **kw):
        state["updates"] = self.get_num_updates() + 1  # the update being made
        if MODE == "forward" and state["updates"] == UPDATE and _mine():
            model = self.get_model()
            hook = model.register_forward_hook(lambda *_: _die())
            try:
                return train_step(self, samples, *a, **kw)
            finally:
                hook.remove()
        out = train_step(self, samples, *a, **kw)
        if MODE == "between" and state["updates"] == UPDATE and _mine():
            _die()  # the update is made, not yet logged or saved
        return out

    Trainer.train_step = counted_train_step

    save = checkpoint_utils.torch_persistent_save

    def persistent_save(obj, filename, *a, **kw):
        if MODE == "save" and state["updates"] == UPDATE and _mine():
            _die_half_way_through(save, obj, filename, *a, **kw)
        return save(obj, filename, *a, **kw)

    checkpoint_utils.torch_persistent_save = persistent_save

    copy = ckpt_io.atomic_copy

    def half_copy(src, dst):
        # (a save at the end of an epoch writes checkpoint_last.pt directly: no
        # copy; strike at the first copy from that update on)
        if MODE == "copy" and state["updates"] >= UPDATE and _mine():
            _die(ckpt_io.tmp_file(dst))
        return copy(src, dst)

    ckpt_io.atomic_copy = half_copy

    atomic = ckpt_io.atomic_save

    def half_shard(obj, path):
        # for fault_run.py: which ranks write expert shards (only the first E may)
        print(
            f"fault_inject: rank {os.environ.get('RANK', '0')} writes {os.path.basename(path)}",
            flush=True,
        )
        if MODE == "shard" and state["updates"] == UPDATE and _mine():
            _die_half_way_through(atomic, obj, path)
        return atomic(obj, path)

    ckpt_io.atomic_save = half_shard


def main():
    import fairseq_cli.train  # noqa: F401  (fairseq's logging setup, as user/train.py)
    from fairseq import utils

    # this checkout's plugin, loaded as --user-dir loads it (fairseq puts the repository
    # first on sys.path), before install() patches it
    utils.import_user_module(Namespace(user_dir=str(REPO / "user")))
    from user.entry import run

    install({"updates": 0})

    run("train")


if __name__ == "__main__":
    main()
