# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Two nodes simulated on one machine: ``NNODES=2 bash run.sh`` started twice, as on
two nodes (two torchrun agents, 2 CPU processes each, meeting at 127.0.0.1), trains
with its experts split within each node and data parallelism across the nodes,
saves to one shared directory, resumes, and its checkpoint translates. The groups
are those each rank reports holding (DeepSpeed's process groups), not arithmetic."""

import re
import time
from pathlib import Path

import pytest
import torch

from mt_run import fairseq_log, processes

from conftest import REPO, cli_env
from test_run_sh import ARCH, RUN_SH, SMALL, num_updates, run_sh

# 4 experts, 2 per expert-parallel group (within a node): 2 replicas, one per node
NODES = {"NNODES": 2, "NUM_GPUS": 2, "MASTER_ADDR": "127.0.0.1", "DEVICE": "cpu",
         "NUM_EXPERTS": 4, "EP_WORLD_SIZE": 2, "MAX_TOKENS": 600}  # fmt: skip
RUN = f"{ARCH}-moe_g4_ep2_ex4_k2_encdec"
# test_run_sh's small model; no validation, a checkpoint every 2 updates
FAST = [*SMALL, "--disable-validation", "--save-interval-updates", "2", "--log-interval", "1"]
LAUNCH_TIMEOUT = 180  # seconds for both agents of one launch together


def two_nodes(env, *args):
    """``bash run.sh ARGS`` started twice at once with ``NODE_RANK`` 0 and 1, as on two
    nodes; returns what each agent added to its log (``train.node<N>.log``, fairseq's
    output) once both exited 0."""
    logs = [Path(env["OUT_DIR"]) / "checkpoints" / RUN / f"train.node{n}.log" for n in (0, 1)]
    before = [log.read_text() if log.exists() else "" for log in logs]
    start = time.time()
    # fmt: off
    procs = processes.run_together(
        [["env", f"NODE_RANK={n}", "bash", RUN_SH, *map(str, args)] for n in (0, 1)],
        timeout=LAUNCH_TIMEOUT, text=True, cwd=REPO,
        env=cli_env(**{k: str(v) for k, v in env.items()}),
    )
    # fmt: on
    outputs = [p.stdout + p.stderr for p in procs]
    for n, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"agent NODE_RANK={n} failed ({p.returncode}):\n{out[-8000:]}"
    print(f"run.sh {' '.join(map(str, args[-2:]))} on two nodes: {time.time() - start:.1f}s")
    return [log.read_text()[len(b) :] for log, b in zip(logs, before)]


@pytest.mark.scale
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT + 60)
def test_two_nodes_train_resume_generate_with_experts_within_a_node(tiny_data, tmp_path):
    env = {**NODES, "DATABIN": tiny_data["databin"], "OUT_DIR": tmp_path,
           "MASTER_PORT": processes.free_port()}  # fmt: skip
    save = tmp_path / "checkpoints" / RUN

    agents = two_nodes(env, *FAST, "--max-update", 4)
    both = "".join(agents)
    assert num_updates(both) == [1, 2, 3, 4]

    # the groups each rank holds: torchrun gives node n the global ranks 2n and 2n+1,
    # each agent's own; experts are split within a node, replicated across nodes
    groups = fairseq_log.expert_groups(both)
    assert sorted(groups) == [0, 1, 2, 3], both[-8000:]
    for rank, g in groups.items():
        assert (g["node"], g["local_rank"]) == (rank // 2, rank % 2), g
    by_agent = [sorted(fairseq_log.expert_groups(out)) for out in agents]
    assert sorted(by_agent) == [[0, 1], [2, 3]], "each agent runs one node's two ranks"
    ep = {tuple(g["expert_parallel"]) for g in groups.values()}
    edp = {tuple(g["expert_data_parallel"]) for g in groups.values()}
    assert ep == {(0, 1), (2, 3)}, "expert-parallel groups lie within a node"
    assert edp == {(0, 2), (1, 3)}, "expert-data-parallel groups span the nodes"
    for rank, g in groups.items():
        assert rank in g["expert_parallel"] and rank in g["expert_data_parallel"]

    # one shared checkpoint: checkpoint_last.pt and one shard per expert-parallel rank
    assert (save / "checkpoint_last.pt").is_file()
    shards = sorted(p.name for p in save.glob("experts.*.pt"))
    assert [re.sub(r"^experts\.[^.]+\.", "", s) for s in shards] == ["0-of-2.pt", "1-of-2.pt"]
    assert len({s.split(".")[1] for s in shards}) == 1, f"one shard set: {shards}"

    # rerun with a higher budget: both nodes resume from update 4
    agents = two_nodes(env, *FAST, "--max-update", 6)
    both = "".join(agents)
    assert fairseq_log.resumed_updates(both) == 4
    assert num_updates(both) == [5, 6], "the rerun must continue at update 5"
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_history"][-1]["num_updates"] == 6

    # run.sh generate is one process: it translates the two-node checkpoint
    proc = run_sh("generate", NODE_RANK=0, **env)
    lines = (save / "generate-test.txt").read_text().splitlines()
    hyps = [line for line in lines if line.startswith("D-")]
    assert len(hyps) == len((tiny_data["raw"] / "test.de").read_text().splitlines()) == 24
    assert re.match(r"BLEU\S* = \d", (save / "generate-test.bleu").read_text()), proc.output
    print(f"generate + score: {proc.seconds:.1f}s")
