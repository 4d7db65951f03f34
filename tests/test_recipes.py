# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""One source per recipe: ``run.sh``, ``scripts/demo.sh``, ``scripts/bench.py`` and
``scripts/bench_perf.py`` train with ``mt_run.recipes``' flags, and follow it when it
changes (a copy of the repository's scripts with an edited recipe)."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from mt_run import recipes
from scripts import bench, bench_perf

from conftest import REPO, cli_env


def contains(cmd, flags):
    """Whether ``flags`` stand in ``cmd`` in a row."""
    return any(cmd[i : i + len(flags)] == flags for i in range(len(cmd) - len(flags) + 1))


def follows_the_edit(cmd):
    """Whether ``cmd`` has the edited tiny recipe's attention dropout and layers."""
    return contains(cmd, ["--attention-dropout", "0.25"]) and contains(
        cmd, ["--encoder-layers", "3"]
    )


def run_sh_dry(repo, **env):
    """The training commands ``bash REPO/run.sh`` prints with DRY_RUN=1, from ``repo``."""
    env = cli_env(
        DRY_RUN="1",
        DATABIN="/data/bin",
        OUT_DIR="/out",
        PYTHON=sys.executable,
        **{k: str(v) for k, v in env.items()},
    )
    proc = subprocess.run(
        ["bash", str(repo / "run.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=repo,
        check=True,
    )
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.timeout(60)
def test_run_sh_trains_with_the_recipes():
    (cmd,) = run_sh_dry(REPO, DEVICE="cpu")
    assert contains(cmd, recipes.train_flags(recipes.settings("tiny", ep_world_size=1)))
    (cmd,) = run_sh_dry(REPO, DEVICE="cpu", DENSE=1)
    assert contains(cmd, recipes.train_flags(recipes.settings("tiny"), moe=False))
    (cmd,) = run_sh_dry(REPO, DEVICE="cuda", NUM_GPUS=8)
    assert contains(cmd, recipes.train_flags(recipes.settings("wmt", ep_world_size=8)))
    # run.sh's own defaults for a recipe come from it too
    assert cmd[cmd.index("--log-interval") + 1] == str(recipes.WMT["log_interval"])


@pytest.mark.timeout(30)
def test_bench_scripts_build_the_tiny_recipe(monkeypatch):
    args = bench.parse_args(["--databin", "/data/bin", "--out", "/out"])
    tiny = recipes.settings("tiny", dense_criterion="model_and_base")
    assert contains(bench.train_command("moe", args, moe=True), recipes.train_flags(tiny))
    assert contains(
        bench.train_command("dense", args, moe=False), recipes.train_flags(tiny, moe=False)
    )
    perf = bench_perf.parse_args([])
    wide = recipes.settings("tiny", **bench_perf.MODEL, ep_world_size=2)
    assert contains(bench_perf.model_args(perf, True, 4096, ep=2), recipes.train_flags(wide))
    # an edited recipe reaches both
    monkeypatch.setitem(recipes.TINY, "attention_dropout", 0.25)
    monkeypatch.setitem(recipes.TINY, "layers", 3)
    cmd = bench.train_command("moe", bench.parse_args(["--databin", "/d", "--out", "/o"]), True)
    assert follows_the_edit(cmd)
    cmd = bench_perf.model_args(bench_perf.parse_args([]), False, 4096)
    assert follows_the_edit(cmd)


@pytest.fixture
def edited_copy(tmp_path):
    """run.sh, scripts/{demo,lib,sacrebleu}.sh and mt_run copied, the tiny recipe edited
    (attention dropout 0.25, 3 layers): the bash scripts, run from the copy, read its recipe."""
    (tmp_path / "scripts").mkdir()
    for path in ("run.sh", "scripts/demo.sh", "scripts/lib.sh", "scripts/sacrebleu.sh"):
        shutil.copy(REPO / path, tmp_path / path)
    shutil.copytree(
        REPO / "mt_run", tmp_path / "mt_run", ignore=shutil.ignore_patterns("__pycache__")
    )
    source = (tmp_path / "mt_run" / "recipes.py").read_text()
    tiny = source.index("TINY = {")
    edited = (
        source[tiny:]
        .replace('"attention_dropout": 0.0,', '"attention_dropout": 0.25,', 1)
        .replace('"layers": 2,', '"layers": 3,', 1)
    )
    assert edited != source[tiny:]
    (tmp_path / "mt_run" / "recipes.py").write_text(source[:tiny] + edited)
    return tmp_path


@pytest.mark.timeout(60)
def test_run_sh_follows_an_edited_recipe(edited_copy):
    (cmd,) = run_sh_dry(edited_copy, DEVICE="cpu")
    assert follows_the_edit(cmd)


def demo_sh_train_args(repo, tmp_path, **env):
    """The arguments ``bash scripts/demo.sh`` (of ``repo``) gives ``user/train.py``, and
    its output: a stand-in interpreter runs Python's -c and -m, records user/train.py's
    arguments and does nothing for the other scripts (data, translation, scoring)."""
    record = tmp_path / "train_args"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
    -c | -m) exec {shlex.quote(sys.executable)} "$@" ;;
    user/train.py) shift; printf '%s\\n' "$@" > {shlex.quote(str(record))} ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = cli_env(PYTHON=str(fake), WORKSPACE=str(tmp_path / "ws"), **env)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        ["bash", "scripts/demo.sh"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return record.read_text().splitlines(), proc.stdout


@pytest.mark.timeout(60)
def test_demo_sh_follows_an_edited_recipe(edited_copy):
    cmd, stdout = demo_sh_train_args(edited_copy, edited_copy, MAX_UPDATE="7")
    assert follows_the_edit(cmd)
    assert "_l3_" in stdout  # the run's name (layers) from the recipe too
    edited = recipes.train_flags({**recipes.TINY, "attention_dropout": 0.25, "layers": 3})
    assert contains(cmd, edited) and contains(cmd, ["--max-update", "7"])
    assert os.path.basename(cmd[0]) == "databin"


@pytest.mark.timeout(60)
def test_demo_sh_passes_router_settings(tmp_path):
    """DROP_TOKENS, Z_LOSS_WEIGHT, CAPACITY_FACTOR and EOM reach the training command;
    they and GATE_WEIGHT name the run folder (a run with other ones does not resume it)."""
    cmd, stdout = demo_sh_train_args(
        REPO, tmp_path, DROP_TOKENS="0", Z_LOSS_WEIGHT="0.001", CAPACITY_FACTOR="1.5", EOM="0.1"
    )
    s = recipes.settings("tiny", drop_tokens=0, z_loss_weight=0.001, capacity_factor=1.5, eom=0.1)
    assert contains(cmd, recipes.train_flags(s))
    assert f"_gw{recipes.TINY['gate_weight']}_cf1.5_dropless_z0.001_eom0.1" in stdout
    _, stdout = demo_sh_train_args(REPO, tmp_path, GATE_WEIGHT="0.1")
    assert "_gw0.1" in stdout


def test_the_dense_twin_is_as_wide_as_the_experts_a_token_passes_through():
    def ffn(flags):
        return [
            flags[flags.index(f"--{side}-ffn-embed-dim") + 1] for side in ("encoder", "decoder")
        ]

    top2 = recipes.settings("tiny", top_k=2, ffn=128)
    assert ffn(recipes.train_flags(top2)) == ["128", "128"]
    assert ffn(recipes.train_flags(top2, moe=False)) == ["256", "256"]
    # a side without MoE layers keeps the dense width
    assert ffn(recipes.train_flags({**top2, "moe_sides": "enc"})) == ["128", "256"]
    # the command line's strings (run.sh, make demo)
    as_typed = recipes.settings("tiny", top_k="2", ffn="128")
    assert ffn(recipes.train_flags(as_typed, moe=False)) == ["256", "256"]
    top1 = recipes.settings("tiny", top_k=1, ffn=256)
    assert ffn(recipes.train_flags(top1, moe=False)) == ["256", "256"]
    # a size the architecture keeps (the wmt recipe's): not passed, whatever top_k
    wmt = recipes.train_flags(recipes.settings("wmt", top_k=2), moe=False)
    assert not any("ffn-embed-dim" in f for f in wmt)


@pytest.mark.parametrize(
    "setting, value, want",
    [
        ("ffn", "abc", "a whole number of at least 1"),
        ("top_k", 0, "a whole number of at least 1"),
        ("drop_tokens", "2", "0 or 1"),
        ("dropout", "1.5", "a number from 0 up to, not including, 1"),
        ("lr", "-1", "a number above 0"),
        ("top_k", "\u00b2", "a whole number of at least 1"),  # (isdigit, but not int's)
        ("moe_sides", "encoder", "enc, dec or both (enc,dec)"),
    ],
)
def test_a_bad_setting_is_refused_by_name(setting, value, want):
    with pytest.raises(ValueError) as e:
        recipes.settings("tiny", **{setting: value})
    assert str(e.value) == f"{setting}={value}: give {want}"
    # while every recipe, and good values as typed, pass
    for name in recipes.RECIPES:
        assert recipes.settings(name) == recipes.RECIPES[name]
    typed = {"ffn": "96", "lr": "1e-3", "dropout": "0.1", "drop_tokens": "0", "eom": ""}
    assert recipes.settings("tiny", **typed)["eom"] is None  # "": not passed
    # numbers as typed go into the JSON flags as JSON; sides as the plugin reads them
    typed = {"label_smoothing": ".1", "gate_weight": ".01", "z_loss_weight": "1e-3"}
    flags = recipes.train_flags(recipes.settings("tiny", moe_sides="enc, dec", **typed))
    config = json.loads(flags[flags.index("--base-criterion-config") + 1])
    weights = json.loads(flags[flags.index("--loss-weights") + 1])
    assert config == {"label_smoothing": 0.1} and weights["experts_gate_loss"] == 0.01
    assert flags[flags.index("--encoder-ffn-embed-dim") + 1] == str(recipes.TINY["ffn"])


@pytest.mark.timeout(60)
def test_bad_overrides_stop_the_scripts_before_any_work(tmp_path):
    """One line naming the setting, exit status 2, and no data prepared."""
    proc = subprocess.run(
        [sys.executable, "-m", "mt_run.recipes", "tiny", "--flags", "ffn=abc"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "python -m mt_run.recipes: error: ffn=abc: give a whole number of at least 1"
    ]
    for script, env in (
        ("scripts/demo.sh", {"FFN_DIM": "abc"}),
        ("run.sh", {"DENSE": "1", "TOP_K": "0"}),
    ):
        workspace = tmp_path / script.replace("/", "_")
        env = cli_env(PYTHON=sys.executable, WORKSPACE=str(workspace), DEVICE="cpu", **env)
        proc = subprocess.run(
            ["bash", script], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
        )
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and ("ffn=abc" in errors[0] or "TOP_K" in errors[0]), errors
        assert not (workspace / "demo_en_de").exists(), f"{script} prepared data first"


def test_only_the_tiny_recipes_moe_has_the_balancing_bias():
    assert contains(recipes.train_flags(recipes.settings("tiny")), ["--moe-bias-balance", "0.001"])
    for flags in (
        recipes.train_flags(recipes.settings("tiny"), moe=False),  # the dense twin
        recipes.train_flags(recipes.settings("tiny", bias_balance="")),  # turned off
        recipes.train_flags(recipes.settings("wmt")),
        recipes.train_flags(recipes.settings("reference")),
    ):
        assert "--moe-bias-balance" not in flags


@pytest.mark.timeout(60)
def test_demo_sh_names_its_run_after_the_balancing_bias(tmp_path):
    cmd, stdout = demo_sh_train_args(REPO, tmp_path)
    assert contains(cmd, ["--moe-bias-balance", str(recipes.TINY["bias_balance"])])
    assert f"_bb{recipes.TINY['bias_balance']}" in stdout
    cmd, stdout = demo_sh_train_args(REPO, tmp_path, BIAS_BALANCE="")
    assert "--moe-bias-balance" not in cmd and "_bb" not in stdout


def test_expert_dropout_is_a_setting_passed_only_when_given():
    assert "--moe-expert-dropout" not in recipes.train_flags(recipes.settings("tiny"))
    flags = recipes.train_flags(recipes.settings("tiny", expert_dropout="0.1"))
    assert contains(flags, ["--moe-expert-dropout", "0.1"])
    assert "--moe-expert-dropout" not in recipes.train_flags(recipes.settings("tiny"), moe=False)
