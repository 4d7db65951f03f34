# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Real 2-process expert-parallel runs of ``user/train.py`` under torchrun (CPU, gloo)."""

import os

from conftest import USER_DIR, run_cli

from mt_run.fairseq_log import losses_by_update

MODEL = [
    "--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "24",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--deepspeed_moe", "enc,dec", "--num-experts", "4", "--moe-freq", "1",
    "--moe-capacity-factor", "2",
    "--criterion", "model_and_base", "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 0.1}',
    "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "400", "--seed", "5", "--dropout", "0.1",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--num-workers", "0",
    "--save-interval-updates", "3", "--keep-interval-updates", "1", "--no-epoch-checkpoints",
]

_port = [20000 + os.getpid() % 20000]


def torchrun(*args, nproc=2, timeout=300):
    """``torchrun --nproc_per_node nproc ARGS`` from this venv, bounded by ``timeout``."""
    _port[0] = 20000 + (_port[0] - 19999) % 20000  # a fresh port for each launch
    return run_cli(["torchrun", "--nproc_per_node", nproc, "--master_port", _port[0], *args],
                   timeout=timeout)


def train2(databin, save_dir, max_update, *extra):
    """``user/train.py`` on 2 CPU processes, expert parallel over both; ``{update: loss}``."""
    proc = torchrun(USER_DIR / "train.py", databin, *MODEL, "--ep-world-size", "2",
                    "--save-dir", save_dir, "--max-update", max_update, *extra)
    return losses_by_update(proc.stdout + proc.stderr)
