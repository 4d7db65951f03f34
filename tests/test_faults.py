# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Training killed with SIGKILL again and again (during a forward pass, while
writing or copying a checkpoint, while writing an expert shard, at random
moments) and restarted ends exactly where an uninterrupted run ends, and the
checkpoint on disk always loads. ``scripts/fault_run.py`` does the work; the
README reports its 10-kill runs."""

import json

import pytest

from conftest import REPO, run_cli


def fault_run(databin, workdir, nproc, kills, seed):
    proc = run_cli(["python", REPO / "scripts" / "fault_run.py", databin, "--workdir", workdir,
                    "--nproc", nproc, "--kills", kills, "--max-update", "10", "--seed", seed],
                   timeout=900, check=False)
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert proc.returncode == 0, summary
    return summary


@pytest.mark.timeout(900)
def test_single_process_survives_repeated_kills(tiny_data, tmp_path):
    s = fault_run(tiny_data["databin"], tmp_path, 1, 3, 11)
    assert s["kills"] >= 3 and s["same_final_loss"] and s["every_logged_update_same"] and s["same_weights"]
    assert all("checkpoint_updates" in f for f in s["faults"] if f["killed"])


@pytest.mark.timeout(900)
def test_expert_parallel_run_survives_repeated_kills(tiny_data, tmp_path):
    s = fault_run(tiny_data["databin"], tmp_path, 2, 2, 3)
    assert s["kills"] >= 2 and s["same_final_loss"] and s["every_logged_update_same"] and s["same_weights"]
    # every kill left a checkpoint whose shared file and shards load together
    assert all("checkpoint_updates" in f for f in s["faults"] if f["killed"])
