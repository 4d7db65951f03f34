# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Training killed with SIGKILL again and again (during a forward pass, right
after an update, while writing or copying a checkpoint, while writing an expert
shard, from outside at a random moment) and restarted ends exactly where an
uninterrupted run ends, and the checkpoint on disk always loads.
``scripts/fault_run.py`` does the work: 10 kills in one process here; the
2-process test kills twice (each launch costs more), the README reports the
script's 10-kill 2-process runs."""

import json

import pytest

from conftest import REPO, run_cli


def fault_run(databin, workdir, nproc, kills, seed, max_update=10):
    # fmt: off
    proc = run_cli(["python", REPO / "scripts" / "fault_run.py", databin, "--workdir", workdir,
                    "--nproc", nproc, "--kills", kills, "--max-update", max_update, "--seed", seed],
                   timeout=900, check=False)
    # fmt: on
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert proc.returncode == 0, summary
    return summary


def assert_nothing_lost(s, kills):
    """At least ``kills`` kills, and the killed run ended exactly as the uninterrupted one;
    every kill left a checkpoint whose shared file and shards load together."""
    assert s["kills"] >= kills
    assert s["same_final_loss"] and s["every_logged_update_same"] and s["same_weights"]
    assert all("checkpoint_updates" in f for f in s["faults"] if f["killed"] is True)


@pytest.mark.timeout(900)
def test_single_process_survives_repeated_kills(tiny_data, tmp_path):
    assert_nothing_lost(fault_run(tiny_data["databin"], tmp_path, 1, 10, 5, max_update=30), 10)


@pytest.mark.timeout(900)
def test_expert_parallel_run_survives_repeated_kills(tiny_data, tmp_path):
    assert_nothing_lost(fault_run(tiny_data["databin"], tmp_path, 2, 2, 3), 2)
