# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Training killed with SIGKILL again and again (during a forward pass, right
after an update, while writing or copying a checkpoint, while writing an expert
shard, from outside at a random moment) and restarted ends exactly where an
uninterrupted run ends, and the checkpoint on disk always loads.
``scripts/fault_run.py`` does the work: 10 kills in one process here, the first in
the middle of fairseq's write of the shared checkpoint; 2 kills with 2 processes
(each launch costs more), one in the middle of that write, one in the middle of a
shard's; 3 with 4 processes and 2 expert replicas (``make test-scale``), in a forward
pass too. The README reports the script's 10-kill 2-process runs."""

import json
import re

import pytest

from conftest import REPO, run_cli


def fault_run(databin, workdir, nproc, kills, seed, first, max_update=10, ep=None):
    # fmt: off
    proc = run_cli(["python", REPO / "scripts" / "fault_run.py", databin, "--workdir", workdir,
                    "--nproc", nproc, "--kills", kills, "--max-update", max_update, "--seed", seed,
                    "--first", first, *(["--ep-world-size", ep] if ep else [])],
                   timeout=900, check=False)
    # fmt: on
    assert "{\n" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert proc.returncode == 0, summary
    return summary


def assert_nothing_lost(s, kills):
    """At least ``kills`` kills (each a SIGKILL: fault_run.py fails on any other death),
    and the killed run logged every update with the uninterrupted run's loss and ended
    with its weights; the killed writes' temporary files were all removed."""
    assert s["kills"] >= kills
    assert s["every_update_logged"] and s["every_logged_update_same"] and s["same_final_loss"]
    assert s["same_weights"]
    assert s["temp_files_left"] == []


def assert_killed_mid_write(s, mode, partial):
    """A ``mode`` kill struck in the middle of a write: its checkpoint never landed (the
    previous one was there after the kill) and its half-written temporary file was."""
    struck = [f for f in s["faults"] if f["mode"] == mode and f["killed"] is True]
    assert struck, f"no kill during {mode}: {s['faults']}"
    for f in struck:
        assert f["checkpoint_updates"] < f["update"], f
        assert any(re.fullmatch(partial, name) for name in f["partial"]), f


@pytest.mark.timeout(900)
def test_single_process_survives_repeated_kills(tiny_data, tmp_path):
    s = fault_run(tiny_data["databin"], tmp_path, 1, 10, 5, "save", max_update=30)
    assert_nothing_lost(s, 10)
    assert_killed_mid_write(s, "save", r"checkpoint\S*\.pt\.tmp")


@pytest.mark.timeout(900)
def test_expert_parallel_run_survives_repeated_kills(tiny_data, tmp_path):
    s = fault_run(tiny_data["databin"], tmp_path, 2, 2, 3, "save,shard")
    assert_nothing_lost(s, 2)
    assert_killed_mid_write(s, "save", r"checkpoint\S*\.pt\.tmp")
    assert_killed_mid_write(s, "shard", r"experts\.\S+\.pt\.tmp\.\S+\.\d+")
    assert_only_first_ranks_write_shards(s, 2)


def assert_only_first_ranks_write_shards(s, ep):
    """The expert shards were written by ranks 0..E-1 (the expert-parallel group of rank
    0), each its own part ``<rank>-of-<E>``: expert-data-parallel replicas write none."""
    assert s["shard_writers"] == list(range(ep)), s["shard_files_by_rank"]
    for rank, names in s["shard_files_by_rank"].items():
        assert names and all(n.endswith(f".{rank}-of-{ep}.pt") for n in names), (rank, names)


@pytest.mark.scale
@pytest.mark.timeout(900)
def test_four_processes_with_two_expert_replicas_survive_kills(tiny_data, tmp_path):
    """W = 4, E = 2: each expert on two ranks (expert-data parallel). Killed in the middle of
    the shared checkpoint's write, of a shard's and of a forward pass, restarted each time:
    the same losses and final weights as the uninterrupted run."""
    s = fault_run(tiny_data["databin"], tmp_path, 4, 3, 3, "save,shard,forward", ep=2)
    assert s["nproc"] == 4 and s["ep_world_size"] == 2
    assert_nothing_lost(s, 3)
    assert_killed_mid_write(s, "save", r"checkpoint\S*\.pt\.tmp")
    assert_killed_mid_write(s, "shard", r"experts\.\S+\.pt\.tmp\.\S+\.\d+")
    assert any(f["mode"] == "forward" and f["killed"] is True for f in s["faults"]), s["faults"]
    assert_only_first_ranks_write_shards(s, 2)
