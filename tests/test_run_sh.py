# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``bash run.sh``: the launcher it picks (dry runs), then real CPU runs on the
tiny dataset: train and its artifacts (its screen off a terminal, its log, summary and
pictures), automatic resume, translate and score, translate one's own sentences, the
dense baseline, 2 expert-parallel processes under torchrun, the bench."""

import re
import shlex
import time

import pytest
import torch

import mt_prep
from mt_run import fairseq_log, processes

from conftest import REPO, cli_env

RUN_SH = REPO / "run.sh"
ARCH = "transformer_ds_moe_tiny"
MOE_RUN = f"{ARCH}-moe_g1_ep1_ex4_k2_encdec"
# a smaller model than run.sh's tiny recipe (pass-through flags win)
# fmt: off
SMALL = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
         "--encoder-layers", "1", "--decoder-layers", "1",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
# fmt: on


def run_sh(*args, timeout=120, check=True, **env):
    """``bash run.sh ARGS`` with ``env`` added; returns the CompletedProcess."""
    start = time.time()
    proc = processes.run(  # run.sh may start torchrun: a timeout kills its workers too
        ["bash", str(RUN_SH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**{k: str(v) for k, v in env.items()}),
        cwd=REPO,
    )
    proc.seconds = time.time() - start
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run.sh {' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def dry(*args, **env):
    """The commands a dry run prints, each split into its words."""
    env = {"DRY_RUN": 1, "DATABIN": "/data/bin", "OUT_DIR": "/out", **env}
    proc = run_sh(*args, timeout=30, **env)
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def flag(cmd, name):
    """The value after the last ``name`` in ``cmd`` (fairseq keeps the last one)."""
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]


# --------------------------------------------------------------------------
# launcher choice and defaults, without running anything


@pytest.mark.timeout(60)
def test_dry_run_picks_the_launcher_and_defaults():
    # one CPU process: plain python, the tiny recipe, resume dir and tensorboard dir by run name
    (cmd,) = dry(DEVICE="cpu")
    assert cmd[1].endswith("user/train.py") and cmd[2] == "/data/bin"
    assert flag(cmd, "--arch") == ARCH and flag(cmd, "--num-experts") == "4"
    assert flag(cmd, "--moe-freq") == "1" and flag(cmd, "--ep-world-size") == "1"
    assert flag(cmd, "--max-tokens") == "1024" and "--cpu" in cmd and "--fp16" not in cmd
    # the tiny recipe is make demo's model
    assert flag(cmd, "--encoder-embed-dim") == "64" and flag(cmd, "--lr") == "0.007"
    assert flag(cmd, "--save-dir") == f"/out/checkpoints/{MOE_RUN}"
    assert flag(cmd, "--tensorboard-logdir") == f"/out/tb/{MOE_RUN}"
    assert flag(cmd, "--loss-weights") == '{"base_crit": 1, "experts_gate_loss": 0.01}'

    # several CPU processes on one node: torchrun --standalone, experts split over them
    (cmd,) = dry(DEVICE="cpu", NUM_GPUS=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    assert cmd[5] == "2" and flag(cmd, "--ep-world-size") == "2"
    assert flag(cmd, "--save-dir").endswith(f"{ARCH}-moe_g2_ep2_ex4_k2_encdec")

    # two GPU nodes: torchrun's c10d rendezvous at MASTER_ADDR (NODE_RANK is not passed:
    # torchrun numbers the nodes), the WMT recipe, fp16 that keeps experts apart
    (cmd,) = dry(DEVICE="cuda", NUM_GPUS=8, NNODES=2, NODE_RANK=1, MASTER_ADDR="10.1.2.3")
    run = cmd[cmd.index("--nnodes") : cmd.index("--rdzv_id") + 2]
    # fmt: off
    assert run == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", "10.1.2.3:29500",
                   "--rdzv_id", "transformer_ds_moe_wmt_en_de-moe_g16_ep8_ex8_k1_encdec"]
    # fmt: on
    assert "--node_rank" not in cmd and "--master_addr" not in cmd
    (other,) = dry(DEVICE="cuda", NUM_GPUS=8, NNODES=2, MASTER_ADDR="10.1.2.3", MASTER_PORT=7)
    assert flag(other, "--rdzv_endpoint") == "10.1.2.3:7"
    assert other[: other.index("--rdzv_endpoint")] == cmd[: cmd.index("--rdzv_endpoint")]
    (other,) = dry(DEVICE="cuda", NUM_GPUS=8, NNODES=2, MASTER_ADDR="h", RDZV_ID="job42")
    assert flag(other, "--rdzv_id") == "job42"
    assert (
        flag(cmd, "--arch") == "transformer_ds_moe_wmt_en_de"
        and flag(cmd, "--max-tokens") == "8192"
    )
    assert flag(cmd, "--ep-world-size") == "8" and flag(cmd, "--num-experts") == "8"
    assert "--fp16" in cmd and "--memory-efficient-fp16" in cmd and "--cpu" not in cmd
    assert flag(cmd, "--lr") == "5e-4" and flag(cmd, "--warmup-updates") == "4000"
    assert flag(cmd, "--save-dir").endswith(
        "transformer_ds_moe_wmt_en_de-moe_g16_ep8_ex8_k1_encdec"
    )

    # experts not divisible by the processes: EP gcd(4, 6) = 2; EP_WORLD_SIZE and
    # pass-through flags win
    (cmd,) = dry(DEVICE="cuda", NUM_GPUS=4, NUM_EXPERTS=6, MASTER_PORT=12345)
    assert flag(cmd, "--ep-world-size") == "2" and flag(cmd, "--master_port") == "12345"
    assert "--memory-efficient-fp16" in cmd
    # the dense baseline keeps fp16 with fp32 master weights (no experts to keep apart)
    (cmd,) = dry(DEVICE="cuda", NUM_GPUS=4, NUM_EXPERTS=6, DENSE=1)
    assert "--fp16" in cmd and "--memory-efficient-fp16" not in cmd
    (cmd,) = dry(DEVICE="cuda", NUM_GPUS=3, NUM_EXPERTS=8, FP16=0)
    assert flag(cmd, "--ep-world-size") == "1" and "--memory-efficient-fp16" not in cmd
    (cmd,) = dry("train", "--max-update", "7", DEVICE="cuda", NUM_GPUS=4, EP_WORLD_SIZE=2, FP16=0)
    assert flag(cmd, "--ep-world-size") == "2" and flag(cmd, "--max-update") == "7"
    assert "--fp16" not in cmd


@pytest.mark.timeout(60)
def test_dry_run_ep_default_is_the_gcd_of_gpus_and_experts_and_says_so():
    # 4 experts on 8 GPUs: EP 4 (each process one expert, two data-parallel copies), not 1
    env = dict(DRY_RUN=1, DATABIN="/data/bin", OUT_DIR="/out", DEVICE="cuda", NUM_GPUS=8)
    proc = run_sh(NUM_EXPERTS=4, **env)
    (cmd,) = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert flag(cmd, "--ep-world-size") == "4"
    assert flag(cmd, "--save-dir").endswith("-moe_g8_ep4_ex4_k1_encdec")
    (line,) = [x for x in proc.stderr.splitlines() if "EP_WORLD_SIZE" in x]
    assert line.startswith("run.sh: EP_WORLD_SIZE=4") and "NUM_GPUS=8" in line
    assert "NUM_EXPERTS=4" in line
    # EP = NUM_GPUS, a dense run or an explicit EP_WORLD_SIZE: nothing to say
    for extra in ({"NUM_EXPERTS": 16}, {"NUM_EXPERTS": 4, "DENSE": 1}, {"EP_WORLD_SIZE": 2}):
        proc = run_sh(**{"NUM_EXPERTS": 4, **env, **extra})
        assert "EP_WORLD_SIZE" not in proc.stderr, (extra, proc.stderr)


@pytest.mark.timeout(60)
def test_dry_run_test_mode_is_generate():
    # the reference's name for translating the test set
    assert dry("test", DEVICE="cpu", SRC="de", TGT="en") == dry(
        "generate", DEVICE="cpu", SRC="de", TGT="en"
    )
    assert dry("test", "--beam", "2", DEVICE="cpu")[0][-2:] == ["--beam", "2"]
    assert re.search(r"^ *test +the same as generate", run_sh("help").stdout, re.M)


@pytest.mark.timeout(60)
def test_dry_run_dense_generate_bench_and_bad_input():
    (cmd,) = dry(DEVICE="cpu", DENSE=1)
    assert "--deepspeed_moe" not in cmd and "--num-experts" not in cmd
    assert flag(cmd, "--criterion") == "label_smoothed_cross_entropy"
    assert flag(cmd, "--save-dir") == f"/out/checkpoints/{ARCH}-baseline"
    # the dense twin does the MoE's compute per token: one FFN as wide as its TOP_K experts
    assert flag(cmd, "--encoder-ffn-embed-dim") == flag(cmd, "--decoder-ffn-embed-dim") == "256"
    (cmd,) = dry(DEVICE="cpu", DENSE=1, TOP_K=1)
    assert flag(cmd, "--encoder-ffn-embed-dim") == "128"

    # generate is one process: the run of two nodes needs no rendezvous address
    (gen, _) = dry("generate", DEVICE="cpu", NNODES=2, NUM_GPUS=2, EP_WORLD_SIZE=2)
    assert gen[1].endswith("user/generate.py") and "moe_g4_ep2_ex4" in flag(gen, "--path")
    gen, score = dry("generate", DEVICE="cpu", SRC="de", TGT="en")
    assert gen[1].endswith("user/generate.py") and flag(gen, "--gen-subset") == "test"
    assert (
        flag(gen, "--path")
        == f"/out/checkpoints/{ARCH}-moe_g1_ep1_ex4_k2_encdec/checkpoint_last.pt"
    )
    assert flag(gen, "--sentencepiece-model") == "/data/bin/spm.model"
    assert score[1].endswith("scripts/sacrebleu.sh")
    assert score[2:] == [
        f"/out/checkpoints/{MOE_RUN}/generate-test.txt",
        "/data/raw/test.en",
        "de",
        "en",
    ]

    dense, moe = dry("bench", DEVICE="cpu", BENCH_UPDATES=9)
    assert "--deepspeed_moe" not in dense and "--deepspeed_moe" in moe
    for cmd in (dense, moe):
        assert flag(cmd, "--max-update") == "9" and "--no-save" in cmd

    # the demo corpus is prepared (idempotently) when DATABIN is not set
    prep, train = dry(DEVICE="cpu", DATABIN="", WORKSPACE="/ws")
    assert prep[1].endswith("scripts/prepare_demo.py") and prep[2:4] == ["--workspace", "/ws"]
    assert train[2] == "/ws/demo_en_de/databin" and flag(train, "--save-dir").startswith("/out/")

    for env, message in (
        ({"NNODES": 2}, "needs MASTER_ADDR"),
        ({"NNODES": 2, "NODE_RANK": 2, "MASTER_ADDR": "h"}, "NODE_RANK 2 must be below NNODES 2"),
        ({"NNODES": 2, "MASTER_ADDR": "h", "MASTER_PORT": "h:1"}, "MASTER_PORT must be a whole"),
        ({"DENSE": "yes"}, "DENSE must be 0 or 1"),
        ({"NUM_GPUS": "two"}, "NUM_GPUS must be a whole number"),
    ):
        proc = run_sh(check=False, DEVICE="cpu", DRY_RUN=1, **env)
        assert proc.returncode == 2 and message in proc.stderr, proc.output
    proc = run_sh("trian", check=False, DEVICE="cpu", DRY_RUN=1)
    assert proc.returncode == 2 and "unknown mode 'trian'" in proc.stderr


# --------------------------------------------------------------------------
# real runs on the tiny dataset (CPU)


@pytest.fixture(scope="module")
def env(tiny_data, tmp_path_factory):
    """run.sh's variables for tiny CPU runs: DEVICE is detected, ARCH and recipe are defaults."""
    return {
        "DATABIN": tiny_data["databin"],
        "OUT_DIR": tmp_path_factory.mktemp("run_sh"),
        "MAX_TOKENS": 600,
    }


@pytest.fixture(scope="module")
def first(env):
    proc = run_sh(*SMALL, "--max-update", 3, "--log-interval", 1, **env)
    return proc


def num_updates(output):
    """Update numbers of fairseq's per-interval log lines."""
    return [int(r["num_updates"]) for r in fairseq_log.parse(output)["train_inner"]]


def log_since(path, text_before=""):
    """What a run appended to the log ``path`` after ``text_before``."""
    text = path.read_text()
    assert text.startswith(text_before)
    return text[len(text_before) :]


def summary_rows(stdout):
    """``{name: value}`` of the summary's ``  name: value`` lines (mt_run.report)."""
    return dict(re.findall(r"^  ([A-Za-z ]+): +(.*)$", stdout, re.M))


def is_png(path, min_bytes=5000):
    with open(path, "rb") as f:
        data = f.read()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= min_bytes


@pytest.mark.timeout(120)
def test_train_writes_checkpoints_and_tensorboard_by_run_name(env, first):
    save = env["OUT_DIR"] / "checkpoints" / MOE_RUN
    assert (save / "checkpoint_last.pt").is_file() and (save / "checkpoint_best.pt").is_file()
    tb = env["OUT_DIR"] / "tb" / MOE_RUN
    assert list(tb.rglob("events.out.tfevents.*")), "no tensorboard event file"
    log = (save / "train.log").read_text()
    assert num_updates(log) == [1, 2, 3]
    assert "moe_ffn" in log and "loss_experts_gate_loss" in log
    print(f"train 3 updates: {first.seconds:.1f}s")


@pytest.mark.timeout(120)
def test_train_off_a_terminal_shows_stages_progress_and_a_summary(env, first):
    save = env["OUT_DIR"] / "checkpoints" / MOE_RUN
    out = first.stdout.splitlines()
    # fairseq's own lines (configuration, module tree, records) went to the log only
    assert not [ln for ln in out if " | INFO | " in ln or "TransformerDSMoEModel(" in ln], out
    assert f"run.sh: fairseq's output: {save / 'train.log'}" in first.stderr
    progress = [ln.split()[1] for ln in out if re.match(r"train +\d+/3 updates", ln)]
    assert progress == ["1/3", "2/3", "3/3"], first.stdout
    assert re.search(r"^valid +update 3: loss [\d.]+$", first.stdout, re.M)
    assert re.search(r"^train +update 3 of 3 in \d+:\d\d", first.stdout, re.M)
    summary = summary_rows(first.stdout)
    assert summary["run folder"] == str(save) and summary["checkpoint"] == "checkpoint_last.pt"
    assert summary["pictures"] == "valid.png, experts.png"
    assert is_png(save / "valid.png") and is_png(save / "experts.png")
    assert summary["translate"].endswith('bash run.sh translate "Select the file."')
    assert "1 process(es) x 1 thread(s)" in summary["machine"]
    assert f"OUT_DIR={env['OUT_DIR']}" in summary["translate"]


@pytest.mark.timeout(120)
def test_rerun_resumes_from_checkpoint_last(env, first):
    save = env["OUT_DIR"] / "checkpoints" / MOE_RUN
    before = (save / "train.log").read_text()
    proc = run_sh(*SMALL, "--max-update", 5, "--log-interval", 1, **env)
    assert "resuming from" in proc.stderr
    assert re.search(r"^train +resumed at update 3$", proc.stdout, re.M)
    log = log_since(save / "train.log", before)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)", log)
    assert num_updates(log) == [4, 5], "the rerun must continue at update 4"
    ckpt = torch.load(
        env["OUT_DIR"] / "checkpoints" / MOE_RUN / "checkpoint_last.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert ckpt["optimizer_history"][-1]["num_updates"] == 5
    print(f"resume to 5 updates: {proc.seconds:.1f}s")


@pytest.mark.timeout(120)
def test_generate_translates_the_test_split_and_scores_it(env, first, tiny_data):
    proc = run_sh("generate", **env)
    save = env["OUT_DIR"] / "checkpoints" / MOE_RUN
    hyps = [
        line
        for line in (save / "generate-test.txt").read_text().splitlines()
        if line.startswith("D-")
    ]
    assert len(hyps) == len((tiny_data["raw"] / "test.de").read_text().splitlines()) == 24
    bleu = (save / "generate-test.bleu").read_text()
    assert re.match(r"BLEU\S* = \d", bleu) and bleu in proc.stdout, proc.output
    assert re.search(r"^translate +24/24 sentences +100%", proc.stdout, re.M)
    assert "Translated 24 sentences" in (save / "generate.log").read_text()
    summary = summary_rows(proc.stdout)
    assert summary["BLEU"].split()[0] == re.search(r" = ([\d.]+)", bleu).group(1)
    copy = re.match(r"[\d.]+", summary["copy source"]).group(0)
    src, ref = (tiny_data["raw"] / f"test.{lang}" for lang in ("en", "de"))
    assert float(copy) == pytest.approx(
        mt_prep.copy_source_bleu(src.read_text().splitlines(), ref.read_text().splitlines()).score,
        abs=0.005,
    )
    # what the score depends on: the machine that trained (recorded then) and this one,
    # with the versions
    assert "1 process(es) x 1 thread(s)" in summary["trained on"], summary
    assert (save / "machine.txt").read_text().strip() == summary["trained on"]
    assert f"torch {torch.__version__}" in summary["translated on"]
    print(f"generate + score: {proc.seconds:.1f}s")


@pytest.mark.timeout(120)
def test_translate_prints_a_translation_a_line(env, first):
    save = env["OUT_DIR"] / "checkpoints" / MOE_RUN
    said = run_sh("translate", "the file is open .", "close the window .", **env)
    lines = said.stdout.splitlines()
    log = (save / "translate.log").read_text()
    # the translations are fairseq's first hypotheses, in order (no source, no score)
    assert lines == re.findall(r"^H-\d+\t\S+\t(.*)$", log, re.M)[-2:] and all(lines), said.output
    # stdin, one sentence a line, with the same checkpoint logic: the same translations
    proc = processes.run(
        ["bash", str(RUN_SH), "translate"],
        input="the file is open .\nclose the window .\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(**{k: str(v) for k, v in env.items()}),
        cwd=REPO,
    )
    assert proc.returncode == 0 and proc.stdout.splitlines() == lines, proc.stderr
    # CHECKPOINT names another run's folder or file, relative to where run.sh is started
    # as any path a user gives; a wrong one is one line
    cwd = env["OUT_DIR"].parent
    other = processes.run(
        ["bash", str(RUN_SH), "translate", "the file is open ."],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env=cli_env(CHECKPOINT=str((save / "checkpoint_last.pt").relative_to(cwd)),
                    OUT_DIR="elsewhere", DATABIN=str(env["DATABIN"])),
    )  # fmt: skip
    assert other.returncode == 0 and other.stdout.splitlines() == lines[:1], other.stderr
    bad = run_sh("translate", "x", check=False, CHECKPOINT=save / "nope.pt", **env)
    assert bad.returncode == 2 and "CHECKPOINT=" in bad.stderr and not bad.stdout


@pytest.mark.timeout(120)
def test_dense_builds_no_moe_layer(env):
    proc = run_sh(*SMALL, "--max-update", 2, DENSE=1, **env)
    log = (env["OUT_DIR"] / "checkpoints" / f"{ARCH}-baseline" / "train.log").read_text()
    ckpt = torch.load(
        env["OUT_DIR"] / "checkpoints" / f"{ARCH}-baseline" / "checkpoint_last.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert ckpt["model"] and not [k for k in ckpt["model"] if "moe" in k]
    assert fairseq_log.parse(log)["train"], "the epoch record is in the log"
    assert "moe_ffn" not in log and "experts_gate_loss" not in log
    assert "experts.png" not in proc.stdout, "a dense run has no expert picture"
    print(f"dense 2 updates: {proc.seconds:.1f}s")


@pytest.mark.timeout(180)
def test_two_cpu_processes_under_torchrun_shard_the_experts(env):
    proc = run_sh(*SMALL, "--max-update", 2, NUM_GPUS=2, **env)
    save = env["OUT_DIR"] / "checkpoints" / f"{ARCH}-moe_g2_ep2_ex4_k2_encdec"
    assert "distributed init (rank 1)" in (save / "train.log").read_text()
    shards = sorted(p.name for p in save.glob("experts.*.pt"))
    assert shards and {re.sub(r"^experts\.[^.]+\.", "", s) for s in shards} == {
        "0-of-2.pt",
        "1-of-2.pt",
    }
    assert (save / "checkpoint_last.pt").is_file()
    print(f"torchrun 2 processes, 2 updates: {proc.seconds:.1f}s")


@pytest.mark.timeout(180)
def test_bench_prints_dense_and_moe_wps(env):
    proc = run_sh("bench", *SMALL, BENCH_UPDATES=3, **env)
    rows = {
        m.group(1): m.group(2) for m in re.finditer(r"^(dense|moe)\s+([\d,]+)\s", proc.stdout, re.M)
    }
    assert set(rows) == {"dense", "moe"}, proc.stdout
    assert all(int(v.replace(",", "")) > 0 for v in rows.values())
    assert "moe/dense:" in proc.stdout
    logs = {
        kind: (env["OUT_DIR"] / "bench" / f"{ARCH}-{kind}.log").read_text()
        for kind in ("dense", "moe")
    }
    assert "moe_ffn" not in logs["dense"] and "moe_ffn" in logs["moe"]
    assert num_updates(logs["dense"]) == num_updates(logs["moe"]) == [1, 2, 3]
    assert not list((env["OUT_DIR"] / "bench").rglob("*.pt")), "bench saves nothing"
    print(f"bench 2 x 3 updates: {proc.seconds:.1f}s")


def test_unset_databin_trains_the_prepared_wmt_data_and_says_which(tmp_path):
    """DATABIN unset: the WMT16 databin prepare-wmt16ende.sh wrote under the same WORKSPACE
    when there is one, else the bundled demo corpus (prepared first); the corpus is named
    at start. Both scripts default WORKSPACE to the repository's workspace folder."""

    def commands(**env):
        proc = run_sh(DRY_RUN=1, DATABIN="", DEVICE="cpu", OUT_DIR="/out", timeout=30, **env)
        cmds = [shlex.split(ln[2:]) for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
        return cmds, proc.stderr

    (prepare, train), said = commands(WORKSPACE=tmp_path)
    demo = f"{tmp_path}/demo_en_de/databin"
    assert prepare[1].endswith("prepare_demo.py") and flag(prepare, "--workspace") == str(tmp_path)
    assert train[2] == demo and f"data: {demo} (the bundled demo corpus" in said

    wmt = tmp_path / "wmt16_en_de" / "databin"
    wmt.mkdir(parents=True)
    for lang in ("en", "de"):  # (a joined dictionary, one file a language)
        (wmt / f"dict.{lang}.txt").write_text("a 1\n")
    (train,), said = commands(WORKSPACE=tmp_path)
    assert train[2] == str(wmt) and f"data: {wmt} (WMT16, prepared by prepare-wmt16ende.sh" in said
    # the other direction (the reference's de->en) trains on the same data
    (train,), said = commands(WORKSPACE=tmp_path, RECIPE="reference")
    assert train[2] == str(wmt) and flag(train, "--source-lang") == "de" and "de->en" in said

    # the same default WORKSPACE in both scripts
    (first, *_), _ = commands(WORKSPACE="")  # preparing the demo, or training on WMT16
    assert str(REPO / "workspace") in " ".join(first)
    prep = processes.run(
        ["bash", str(REPO / "prepare-wmt16ende.sh")],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env=cli_env(PYTHON="echo", WORKSPACE=""),
    )  # fmt: skip
    words = prep.stdout.split()
    assert words[words.index("--workspace") + 1] == str(REPO / "workspace"), prep.stdout


def test_wmt_defaults_and_recipe_reference_follow_the_reference_plugin():
    """The WMT recipe batches as the reference (8192 tokens, 16 batches per update, the same
    for validation); RECIPE=reference is its example command flag for flag, but for the
    corrections, each said at start."""
    (cmd,) = dry(DEVICE="cuda", NUM_GPUS=8)
    assert flag(cmd, "--max-tokens") == flag(cmd, "--max-tokens-valid") == "8192"
    assert flag(cmd, "--update-freq") == "16"
    (cmd,) = dry(DEVICE="cpu")  # the tiny recipe keeps its own
    assert flag(cmd, "--update-freq") == "1" and flag(cmd, "--max-tokens-valid") == "1024"
    # bench measures tokens/s with one batch an update, unless UPDATE_FREQ is set
    assert [flag(c, "--update-freq") for c in dry("bench", DEVICE="cuda", NUM_GPUS=8)] == ["1"] * 2
    bench = dry("bench", DEVICE="cuda", NUM_GPUS=8, UPDATE_FREQ=4)
    assert [flag(c, "--update-freq") for c in bench] == ["4"] * 2

    proc = run_sh(DRY_RUN=1, DATABIN="/data/bin", OUT_DIR="/out", DEVICE="cuda", NUM_GPUS=8,
                  RECIPE="reference", timeout=30)  # fmt: skip
    (cmd,) = [shlex.split(ln[2:]) for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    want = {
        "--seed": "43821", "--ddp-backend": "legacy_ddp", "--task": "translation_deepspeed",
        "--deepspeed_moe": "enc,dec", "--ep-world-size": "8", "--num-experts": "8",
        "--top-k": "1", "--criterion": "model_and_base",
        "--base-criterion": "label_smoothed_cross_entropy",
        "--base-criterion-config": '{"label_smoothing": 0.1}',
        "--arch": "transformer_ds_moe_tiny", "--source-lang": "de", "--target-lang": "en",
        "--optimizer": "adam", "--adam-betas": "(0.9, 0.98)", "--clip-norm": "0.0",
        "--lr": "5e-4", "--dropout": "0.3", "--weight-decay": "0.0001",
        "--lr-scheduler": "inverse_sqrt", "--warmup-updates": "4000", "--max-update": "300000",
        "--max-tokens-valid": "8192", "--max-tokens": "8192", "--update-freq": "16",
        "--validate-interval-updates": "20", "--scoring": "sacrebleu",
        "--eval-bleu-args": '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}',
        "--eval-bleu-detok": "moses", "--best-checkpoint-metric": "bleu",
        "--keep-last-epochs": "1", "--save-interval-updates": "100",
        "--keep-interval-updates": "1",
        # corrections: the gate loss scaled per token, BLEU over detokenized words
        "--loss-weights": '{"base_crit": 1, "experts_gate_loss": 0.01}',
        "--eval-bleu-remove-bpe": "sentencepiece",
    }  # fmt: skip
    assert {k: flag(cmd, k) for k in want} == want
    for switch in ("--fp16", "--eval-bleu", "--eval-bleu-print-samples",
                   "--maximize-best-checkpoint-metric"):  # fmt: skip
        assert switch in cmd, switch
    for dropped in ("--reset-optimizer", "--no-epoch-checkpoints", "--warmup-init-lr"):
        assert dropped not in cmd, dropped
    said = [ln for ln in proc.stderr.splitlines() if "RECIPE=reference" in ln]
    assert len(said) == 4 and all(ln.startswith("run.sh: RECIPE=reference:") for ln in said)
    assert any(ln.startswith("run.sh: RECIPE=reference: --memory-efficient-fp16") for ln in said)
    assert "--memory-efficient-fp16" in cmd  # (--fp16 alone is refused with EP > 1)
    assert any("--reset-optimizer" in ln for ln in said)
    assert any("experts_gate_loss" in ln and "0.01" in ln for ln in said)
    assert any("--eval-bleu-remove-bpe sentencepiece" in ln for ln in said)

    # translation takes none of training's corrections
    gen = run_sh("generate", DRY_RUN=1, DATABIN="/d", OUT_DIR="/o", DEVICE="cuda", NUM_GPUS=8,
                 RECIPE="reference", timeout=30)  # fmt: skip
    assert "RECIPE=reference" not in gen.stderr
    bad = run_sh(DRY_RUN=1, DATABIN="/data/bin", RECIPE="big", check=False, timeout=30)
    assert bad.returncode == 2 and "RECIPE must be tiny, wmt or reference" in bad.stderr
