# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Expert-parallel checkpoints: the pure layout conversions first, then real
2-process training under torchrun (gloo, CPU): sharded save, exact resume,
pruning, resharding EP=2 -> 1 -> 2, and single-process loading."""

import os
import shutil

import pytest
import torch

from mt_run.fairseq_log import losses_by_update
from mt_run.recipes import MICRO
from user.checkpoint import format as fmt
from user.checkpoint import io as ckpt_io

from conftest import REPO, USER_DIR, run_cli
from ep_helpers import torchrun, train2
from moe_helpers import KEY_BIAS

E = "m.layers.0.moe_ffn.moe.deepspeed_moe.experts.deepspeed_experts"


# --------------------------------------------------------------------------
# names and layouts


def test_expert_names_shift_between_local_and_global():
    assert fmt.expert_index(f"{E}.3.fc1.weight") == 3
    assert fmt.expert_index("m.layers.0.fc1.weight") is None
    assert fmt.shift_expert(f"{E}.1.fc2.bias", 4) == f"{E}.5.fc2.bias"


def test_relayout_names_rebuilds_each_expert_block_in_place():
    names = [
        "emb",
        f"{E}.0.fc1.weight",
        f"{E}.0.fc2.weight",
        f"{E}.1.fc1.weight",
        f"{E}.1.fc2.weight",
        "gate",
        "out",
    ]
    assert fmt.relayout_names(names, 1) == [
        "emb",
        f"{E}.0.fc1.weight",
        f"{E}.0.fc2.weight",
        "gate",
        "out",
    ]
    four = fmt.relayout_names(names, 4)
    assert four[0] == "emb" and four[-2:] == ["gate", "out"]
    assert four[1:9] == [f"{E}.{i}.fc{j}.weight" for i in range(4) for j in (1, 2)]


def _full_state(n_experts=4):
    """A consolidated checkpoint: 1 dense param, n experts x 2 params, Adam-like state."""
    names = ["dense.w"] + [f"{E}.{i}.fc{j}.weight" for i in range(n_experts) for j in (1, 2)]
    model = {n: torch.full((2,), float(k)) for k, n in enumerate(names)}
    opt = {
        "state": {
            k: {"step": torch.tensor(7.0), "exp_avg": torch.full((2,), 10.0 + k)}
            for k in range(len(names))
        },
        "param_groups": [{"lr": 0.1, "params": list(range(len(names)))}],
    }
    state = {
        "cfg": {"model": {"ep_world_size": 1}},
        "model": model,
        "last_optimizer_state": opt,
        "extra_state": {"param_names": names},
        "optimizer_history": [{"num_updates": 7}],
    }
    return state, names


def test_scatter_then_gather_gives_back_the_consolidated_checkpoint():
    full, names = _full_state()
    shared, shards = fmt.scatter(full, 2, "tok", names)
    info = shared["extra_state"][fmt.SHARD_KEY]
    assert (
        info["ep_size"] == 2
        and info["num_experts"] == 4
        and shared["cfg"]["model"]["ep_world_size"] == 2
    )
    # rank 0's file holds its 2 experts under local names; rank 1's shard holds experts 2, 3
    assert sorted(k for k in shared["model"] if fmt.expert_index(k) is not None) == sorted(
        f"{E}.{i}.fc{j}.weight" for i in (0, 1) for j in (1, 2)
    )
    assert sorted(fmt.expert_index(k) for k in shards[1]["model"]) == [2, 2, 3, 3]
    assert len(shared["last_optimizer_state"]["state"]) == 5
    back = fmt.gather(shared, list(reversed(shards)))
    assert back["cfg"]["model"]["ep_world_size"] == 1
    assert back["model"].keys() == full["model"].keys()
    assert all(torch.equal(back["model"][k], full["model"][k]) for k in full["model"])
    # optimizer state follows its parameter through both re-indexings
    assert back["last_optimizer_state"]["param_groups"][0]["params"] == list(range(len(names)))
    for k in range(len(names)):
        assert torch.equal(
            back["last_optimizer_state"]["state"][k]["exp_avg"],
            full["last_optimizer_state"]["state"][k]["exp_avg"],
        )


def test_gather_refuses_missing_or_foreign_shards():
    full, names = _full_state()
    shared, shards = fmt.scatter(full, 2, "tok", names)
    with pytest.raises(fmt.ExpertCheckpointError, match=r"ranks \[1\]"):
        fmt.gather(shared, shards[:1])
    foreign = dict(shards[1], token="other")
    with pytest.raises(fmt.ExpertCheckpointError, match="does not belong"):
        fmt.gather(shared, [shards[0], foreign])
    with pytest.raises(fmt.ExpertCheckpointError, match="cannot be split"):
        fmt.scatter(full, 3, "tok", names)


def test_a_shard_is_read_once_per_checkpoint_load(tmp_path, monkeypatch):
    """A resume needs a rank's shard for the weights, then for the optimizer state."""
    full, names = _full_state()
    shared, shards = fmt.scatter(full, 2, "tok", names)
    info = shared["extra_state"][fmt.SHARD_KEY]
    for r, shard in enumerate(shards):
        torch.save(shard, ckpt_io.shard_file(str(tmp_path), "tok", r, 2))
    reads = []
    real = ckpt_io.read_checkpoint
    monkeypatch.setattr(
        ckpt_io, "read_checkpoint", lambda path, mmap=False: reads.append(path) or real(path, mmap)
    )
    reader = ckpt_io.ShardReader({**info, "directory": str(tmp_path)}, 4)
    first = reader(1)
    assert reader(1) is first
    assert len(reads) == 1
    reader.forget()  # after the load nothing is kept
    assert reader(1) is not first and len(reads) == 2
    # a reader sent to another rank (fairseq pickles the loaded checkpoint) carries no shard
    import pickle

    assert pickle.loads(pickle.dumps(reader))._memory == {}


def test_prune_keeps_exactly_the_shards_a_checkpoint_names(tmp_path):
    for name, token in (("checkpoint_last.pt", "u9-b"), ("checkpoint_1_6.pt", "u6-a")):
        torch.save({"extra_state": {fmt.SHARD_KEY: {"token": token}}}, tmp_path / name)
    for token in ("u3-z", "u6-a", "u9-b", "u12-new"):
        for r in range(2):
            torch.save({}, ckpt_io.shard_file(str(tmp_path), token, r, 2))
    removed = ckpt_io.prune_shards(str(tmp_path), keep=["u12-new"])
    assert sorted(os.path.basename(p) for p in removed) == [
        "experts.u3-z.0-of-2.pt",
        "experts.u3-z.1-of-2.pt",
    ]
    left = sorted(p.name for p in tmp_path.glob("experts.*"))
    assert left == sorted(
        f"experts.{t}.{r}-of-2.pt" for t in ("u6-a", "u9-b", "u12-new") for r in range(2)
    )


@pytest.mark.parametrize("case", ["text", "truncated", "a list", "no model", "dst is a directory"])
def test_reshard_of_a_bad_file_is_one_clear_line(tmp_path, capsys, case):
    """Item 5e: what is not a checkpoint, and a directory as the output, are named."""
    from user.checkpoint.reshard import main

    good = tmp_path / "good.pt"
    torch.save(_full_state()[0], good)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    expected = {
        "text": "the file is truncated or corrupt",
        "truncated": "the file is truncated or corrupt",
        "a list": "is not a fairseq checkpoint",
        "no model": "is not a fairseq checkpoint",
        "dst is a directory": "is a directory: give the output file, e.g. ",
    }[case]
    if case == "text":
        src.write_text("source sentences\n")
    elif case == "truncated":
        src.write_bytes(good.read_bytes()[:1000])
    elif case in ("a list", "no model"):
        torch.save([1, 2] if case == "a list" else {"args": None}, src)
    else:
        src, dst = good, tmp_path / "outdir"
        dst.mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(src), str(dst), "--ep-size", "1"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and line.startswith("python -m user.reshard: error: ")
    assert expected in line and str(dst if case == "dst is a directory" else src) in line
    written = sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith("out"))
    assert written == (["outdir"] if case == "dst is a directory" else []), "nothing is written"


def test_atomic_save_leaves_no_temp_file(tmp_path):
    ckpt_io.atomic_save({"a": torch.ones(2)}, str(tmp_path / "x.pt"))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], torch.ones(2))


# a save killed half-way through torch.save's write, as a SIGKILL mid-save leaves it
KILLED_SAVE = """
import os, signal, sys, torch
from user.checkpoint import io

class Dying:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += self.f.write(b)
        if self.n > 100_000:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return len(b)
    def flush(self):
        self.f.flush()

save = torch.save
torch.save = lambda obj, f: save(obj, Dying(f))
io.atomic_save({"w": torch.ones(100_000)}, sys.argv[1])
"""


@pytest.mark.timeout(60)
def test_the_next_save_removes_the_temp_files_of_killed_saves_only(tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    shard = tmp_path / "experts.a.0-of-2.pt"
    with subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(shard)], cwd=REPO) as killed:
        assert killed.wait(50) == -signal.SIGKILL
    (left,) = tmp_path.iterdir()  # the killed save's temporary file, 100 kB and more
    assert left.name == f"{shard.name}.tmp.{socket.gethostname()}.{killed.pid}"
    assert left.stat().st_size > 100_000 and not shard.exists()
    with subprocess.Popen(["sleep", "60"]) as live:
        try:
            keep = [
                tmp_path / f"x.pt.tmp.{socket.gethostname()}.{live.pid}",  # a save in progress
                tmp_path / f"x.pt.tmp.another-node.{killed.pid}",  # can't be checked from here
            ]
            for p in keep:
                p.write_bytes(b"partial")
            ckpt_io.atomic_save({"a": torch.ones(2)}, str(tmp_path / "y.pt"))
        finally:
            live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["y.pt", *(p.name for p in keep)])


# --------------------------------------------------------------------------
# real 2-process runs


def consolidated(path, out):
    """``python -m user.reshard path out --ep-size 1``, in this process (the CLI is
    run in the tests below)."""
    from user.checkpoint.reshard import reshard

    reshard(str(path), str(out), 1)
    return torch.load(out, map_location="cpu", weights_only=False)


def assert_same_training_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)


@pytest.fixture(scope="module")
def runs(tiny_data, ep2_run, tmp_path_factory):
    """Uninterrupted (0 -> 9) and interrupted (0 -> 6, resume -> 9) 2-process runs."""
    db = tiny_data["databin"]
    root = tmp_path_factory.mktemp("ep_ckpt")
    cut = root / "cut"
    return {
        "db": db,
        "root": root,
        "straight": ep2_run["save"],
        "cut": cut,
        "straight_losses": ep2_run["losses"],
        "first_losses": train2(db, cut, 6),
        "resumed_losses": train2(db, cut, 9),
    }


@pytest.mark.timeout(600)
def test_each_rank_writes_its_shard_and_pruning_follows_the_checkpoints(runs):
    cut = runs["cut"]
    tokens = {}
    for main in cut.glob("checkpoint*.pt"):
        state = torch.load(main, map_location="cpu", weights_only=False)
        tokens[main.name] = state["extra_state"][fmt.SHARD_KEY]["token"]
    info = torch.load(cut / "checkpoint_last.pt", map_location="cpu", weights_only=False)[
        "extra_state"
    ][fmt.SHARD_KEY]
    assert info["ep_size"] == 2 and info["num_experts"] == 4 and info["num_updates"] == 9
    # exactly the shards some checkpoint names are left (those of updates 3 and 6 were pruned)
    shards = sorted(p.name for p in cut.glob("experts.*.pt"))
    assert shards == sorted(
        f"experts.{t}.{r}-of-2.pt" for t in set(tokens.values()) for r in range(2)
    )
    assert not any(name.startswith("experts.u3-") for name in shards)
    s0, s1 = (ckpt_io.read_shard(str(cut), info, r) for r in range(2))
    assert sorted({fmt.expert_index(k) for k in s0["model"]}) == [0, 1]
    assert sorted({fmt.expert_index(k) for k in s1["model"]}) == [2, 3]
    assert s1["optimizer"], "rank 1's experts carry their Adam state"
    # rank 1's experts are not rank 0's: the shared file alone could not restore them
    k0 = next(k for k in s0["model"] if ".0.fc1.weight" in k)
    assert not torch.equal(s0["model"][k0], s1["model"][k0.replace(".0.fc1", ".2.fc1")])


@pytest.mark.timeout(600)
def test_resumed_two_process_run_matches_the_uninterrupted_one(runs):
    straight, resumed = runs["straight_losses"], runs["resumed_losses"]
    assert sorted(resumed) == [7, 8, 9], resumed
    assert {u: straight[u] for u in (7, 8, 9)} == resumed
    a = consolidated(runs["straight"] / "checkpoint_last.pt", runs["root"] / "a.pt")
    b = consolidated(runs["cut"] / "checkpoint_last.pt", runs["root"] / "b.pt")
    assert_same_training_state(a, b)


@pytest.mark.timeout(600)
def test_reshard_to_one_process_gives_the_expert_parallel_outputs(runs):
    cut, root = runs["cut"], runs["root"]
    cons = consolidated(cut / "checkpoint_last.pt", root / "cons.pt")
    assert fmt.SHARD_KEY not in cons["extra_state"]
    assert (
        sum(fmt.expert_index(k) is not None for k in cons["model"]) == 2 * 4 * 4
    )  # 2 layers x 4 experts x 4 tensors
    out_dir = root / "outputs"
    out_dir.mkdir()
    torchrun(REPO / "tests" / "ep_forward_worker.py", cut / "checkpoint_last.pt", out_dir, 6)

    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(root / "cons.pt")])
    model = models[0].eval()
    assert model.moe_opts.ep_size == 1
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(6)])
    with torch.no_grad():
        ref = model(**sample["net_input"])[0]
    for r in range(2):
        got = torch.load(out_dir / f"rank{r}.pt")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(600)
def test_a_resharded_checkpoint_resumes_training_like_the_original(runs, tmp_path):
    db, root = runs["db"], tmp_path
    # the other tests read runs["cut"] at 9 updates: train on from a copy of it
    cut = root / "cut"
    shutil.copytree(runs["cut"], cut)
    # EP=2 -> consolidated -> EP=2 again, in a new save dir
    consolidated(cut / "checkpoint_last.pt", root / "c9.pt")
    re2 = root / "re2"
    run_cli(
        [
            "python",
            "-m",
            "user.reshard",
            root / "c9.pt",
            re2 / "checkpoint_last.pt",
            "--ep-size",
            "2",
        ]
    )
    assert len(list(re2.glob("experts.*.pt"))) == 2
    original = train2(db, cut, 11)
    resharded = train2(db, re2, 11)
    assert sorted(resharded) == [10, 11] and resharded == original
    assert_same_training_state(
        consolidated(cut / "checkpoint_last.pt", root / "o11.pt"),
        consolidated(re2 / "checkpoint_last.pt", root / "r11.pt"),
    )


@pytest.mark.timeout(300)
def test_generate_from_an_expert_parallel_checkpoint_in_one_process(runs):
    # fmt: off
    proc = run_cli(["python", USER_DIR / "generate.py", runs["db"], "--task", "translation_deepspeed",
                    "--path", runs["straight"] / "checkpoint_last.pt", "--gen-subset", "valid",
                    "--beam", "2", "--max-len-b", "10", "--num-workers", "0", "--cpu"])
    # fmt: on
    hyps = [ln for ln in proc.stdout.splitlines() if ln.startswith("H-")]
    assert len(hyps) == 40


@pytest.mark.timeout(300)
def test_reshard_errors_are_one_clear_line(runs, tmp_path):
    proc = run_cli(
        [
            "python",
            "-m",
            "user.reshard",
            runs["cut"] / "checkpoint_last.pt",
            tmp_path / "x.pt",
            "--ep-size",
            "3",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "4 experts cannot be split over 3 ranks" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
    # a shared file whose shards are gone
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "checkpoint_last.pt").write_bytes((runs["cut"] / "checkpoint_last.pt").read_bytes())
    proc = run_cli(
        [
            "python",
            "-m",
            "user.reshard",
            lonely / "checkpoint_last.pt",
            tmp_path / "y.pt",
            "--ep-size",
            "1",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "is missing" in proc.stderr and "experts." in proc.stderr
    assert not (tmp_path / "y.pt").exists()


# --------------------------------------------------------------------------
# at the reference's scale: 8 processes, one expert each


@pytest.mark.scale
@pytest.mark.timeout(900)
def test_an_eight_process_checkpoint_resharded_to_four_trains_on_alike(tiny_data, tmp_path):
    """W = E = 8 trains two epochs, saving at the end of each. Its epoch-1 checkpoint,
    resharded 8 -> 1 -> 4, resumes on 4 processes (two experts each, --update-freq 2: the
    same global batches) with the 8-process run's epoch-2 losses; the 8-process
    checkpoint translates in one process exactly as its consolidated copy does."""
    db = tiny_data["databin"]
    # every token fits (capacity factor = experts) and no dropout: splitting the batch
    # changes nothing; epoch checkpoints, so that the resume starts a fresh epoch
    # fmt: off
    flags = [f for f in MICRO if f != "--no-epoch-checkpoints"] + [
        "--num-experts", "8", "--moe-capacity-factor", "8", "--moe-eval-capacity-factor", "8",
        "--dropout", "0", "--seed", "5", "--max-epoch", "2", "--disable-validation"]
    # fmt: on
    w8 = tmp_path / "w8"
    out8 = torchrun(
        USER_DIR / "train.py", db, *flags, "--ep-world-size", "8", "--save-dir", w8,
        nproc=8, timeout=600,
    )  # fmt: skip
    losses8 = losses_by_update(out8.stdout + out8.stderr)
    epoch1 = torch.load(w8 / "checkpoint1.pt", map_location="cpu", weights_only=False)
    u1 = epoch1["optimizer_history"][-1]["num_updates"]
    assert epoch1["extra_state"][fmt.SHARD_KEY]["ep_size"] == 8
    assert 1 < u1 < max(losses8) and sorted(losses8) == list(range(1, max(losses8) + 1))

    one, four = tmp_path / "one.pt", tmp_path / "w4"
    run_cli(["python", "-m", "user.reshard", w8 / "checkpoint1.pt", one, "--ep-size", "1"])
    run_cli(["python", "-m", "user.reshard", one, four / "checkpoint_last.pt", "--ep-size", "4"])
    assert sorted(p.name.rpartition(".")[0][-6:] for p in four.glob("experts.*.pt")) == [
        f"{r}-of-4" for r in range(4)
    ]
    out4 = torchrun(
        USER_DIR / "train.py", db, *flags, "--ep-world-size", "4", "--update-freq", "2",
        "--save-dir", four, nproc=4, timeout=600,
    )  # fmt: skip
    losses4 = losses_by_update(out4.stdout + out4.stderr)
    assert sorted(losses4) == [u for u in sorted(losses8) if u > u1], (u1, losses4)
    # the log's 3 decimals
    assert losses4 == {u: pytest.approx(v, abs=1.5e-3) for u, v in losses8.items() if u > u1}
    # and the same weights at the end of epoch 2 (the sums of gradients are split
    # differently: equal up to rounding, key biases aside, see moe_helpers.KEY_BIAS)
    a = consolidated(w8 / "checkpoint_last.pt", tmp_path / "a.pt")["model"]
    b = consolidated(four / "checkpoint_last.pt", tmp_path / "b.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        if not KEY_BIAS.search(k):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)

    # the 8-process checkpoint in one process: the consolidated file's translations
    def translate(path):
        # fmt: off
        proc = run_cli(["python", USER_DIR / "generate.py", db, "--task", "translation_deepspeed",
                        "--path", path, "--gen-subset", "valid", "--beam", "2", "--max-len-b", "10",
                        "--num-workers", "0", "--cpu"])
        # fmt: on
        return sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("H-"))

    direct = translate(w8 / "checkpoint1.pt")
    assert len(direct) == 40 and direct == translate(one)
