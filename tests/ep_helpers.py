# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Real 2-process expert-parallel runs of ``user/train.py`` under torchrun (CPU, gloo)."""

from mt_run import processes
from mt_run.fairseq_log import losses_by_update
from mt_run.recipes import MICRO

from conftest import USER_DIR, run_cli

# the micro model (mt_run.recipes) with room for every token, a checkpoint every 3 updates
# fmt: off
MODEL = [*MICRO, "--moe-capacity-factor", "2", "--seed", "5", "--save-interval-updates", "3",
         "--keep-interval-updates", "1"]
# fmt: on


def torchrun(*args, nproc=2, timeout=300):
    """``torchrun --nproc_per_node nproc ARGS`` from this venv, bounded by ``timeout``."""
    port = processes.free_port()  # a fresh one for each launch
    return run_cli(
        ["torchrun", "--nproc_per_node", nproc, "--master_port", port, *args], timeout=timeout
    )


def train2_output(databin, save_dir, max_update, *extra):
    """``user/train.py`` on 2 CPU processes, expert parallel over both; its output."""
    proc = torchrun(
        USER_DIR / "train.py",
        databin,
        *MODEL,
        "--ep-world-size",
        "2",
        "--save-dir",
        save_dir,
        "--max-update",
        max_update,
        *extra,
    )
    return proc.stdout + proc.stderr


def train2(databin, save_dir, max_update, *extra):
    """:func:`train2_output`'s ``{update: loss}``."""
    return losses_by_update(train2_output(databin, save_dir, max_update, *extra))
