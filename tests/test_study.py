# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The quality study (``make study``, ``scripts/study.py``): the recipe's router settings
reach fairseq as the plugin's flags, every screened variant changes one thing of the
baseline MoE at the dense model's active FLOPs, and the verdict is computed from the
runs' logs. The study itself trains for an hour: not run here."""

import json
import subprocess

import pytest

from mt_run import recipes
from scripts import study


def parsed(settings):
    """The recipe's MoE flags as fairseq-train parses them, and the plugin's options."""
    from fairseq import options

    from user.moe_options import options_from_args

    flags = recipes.train_flags(settings)
    args = options.parse_args_and_arch(options.get_training_parser(), ["databin", *flags])
    return args, options_from_args(args)


def test_router_settings_become_the_plugins_flags():
    s = recipes.settings("tiny", capacity_factor=1.25, drop_tokens=0, z_loss_weight=0.001, eom=0.2)
    args, opts = parsed(s)
    assert opts.capacity_factor == 1.25 and opts.drop_tokens is False
    assert opts.z_loss is True and opts.eom == 0.2
    weights = json.loads(args.loss_weights)
    assert weights == {"base_crit": 1, "experts_gate_loss": 0.01, "experts_z_loss": 0.001}
    # and the baseline the study changes: the plugin's defaults, no z-loss term
    args, opts = parsed(recipes.settings("tiny", **study.BASELINE))
    assert opts.capacity_factor == 1.0 and opts.drop_tokens is True
    assert opts.z_loss is False and opts.eom == 0.0
    assert "experts_z_loss" not in json.loads(args.loss_weights)


def test_each_variant_changes_what_it_says_at_equal_active_flops():
    runs = study.screen_runs([1, 2])
    assert len(runs) == 2 * len(study.SCREEN) and {r[3] for r in runs} == {1, 2}
    base = study.moe_settings({})
    for name, moe, s, _seed in runs:
        if not moe:
            assert name == "dense" and s == base  # its flags: recipes.train_flags(moe=False)
            continue
        changed = {k for k in s if s[k] != base[k]}
        assert changed == set(study.SCREEN[name][1]), name
        assert s["ffn"] * s["top_k"] == base["ffn"], name  # the dense FFN's FLOPs per token


def test_the_final_pairs_the_recipe_with_its_dense_twin(monkeypatch):
    pairs = study.final_pairs([1, 2, 3])
    assert [(d[3], m[3]) for d, m in pairs] == [(1, 1), (2, 2), (3, 3)]
    for (_, dense_moe, dense, _), (_, moe_moe, moe, _) in pairs:
        assert not dense_moe and moe_moe and dense == moe == study.moe_settings()
    # the dense twin of the recipe is the screen's dense model (the same flags)
    screen_dense = study.screen_runs([1])[0]
    assert screen_dense[0] == "dense"
    assert recipes.train_flags(pairs[0][0][2], moe=False) == recipes.train_flags(
        screen_dense[2], moe=False
    )
    # the recipe named after the screened variant it equals, if any
    for key, value in study.BASELINE.items():
        monkeypatch.setitem(recipes.TINY, key, value)
    assert study.recipe_name() == "moe"
    monkeypatch.setitem(recipes.TINY, "experts", 8)
    assert study.recipe_name() == "e8"
    monkeypatch.setitem(recipes.TINY, "experts", 6)
    assert study.recipe_name() == "recipe"


def log(bleus, walls):
    """A parsed fairseq log: validations at updates 200, 400, ... with these BLEU, a
    ``train_inner`` record with the cumulative wall clock just before each."""
    updates = [200 * (i + 1) for i in range(len(bleus))]
    return {
        "train_inner": [
            {"num_updates": u, "wall": w, "wps": 1.0, "wpb": 1.0} for u, w in zip(updates, walls)
        ],
        "train": [],
        "valid": [
            {"num_updates": u, "bleu": b, "epoch": 1, "wps": 1.0} for u, b in zip(updates, bleus)
        ],
    }


def test_reach_is_the_first_validation_at_the_dense_best():
    dense = log([5.0, 8.0, 7.5], [10.0, 20.0, 30.0])
    assert study.reach(log([6.0, 8.0, 9.0], [12.0, 26.0, 36.0]), dense) == (1.0, 1.3)
    assert study.reach(log([8.0, 9.0], [11.0, 22.0]), dense) == (0.5, 0.55)
    assert study.reach(log([1.0, 7.99], [11.0, 22.0]), dense) == (None, None)


def result(name, seed, test_bleu):
    return {
        "name": name,
        "seed": seed,
        "test_bleu": test_bleu,
        "test_signature": "BLEU|sig",
        "best_valid_bleu": 8.0,
        "updates_to_best": 400,
        "log": f"{name}-{seed}",
    }


def test_final_verdict_from_the_runs():
    logs = {"dense": log([5.0, 8.0], [10.0, 20.0]), "moe": log([8.0, 9.0], [12.0, 24.0])}
    pairs = [
        (result("dense", seed, d), result("moe", seed, m))
        for seed, (d, m) in enumerate([(10.0, 11.5), (10.5, 11.0), (9.5, 11.0)], 1)
    ]
    table, verdict = study.final_table(pairs, lambda r: logs[r["name"]])
    assert verdict["seeds"] == [1, 2, 3] and verdict["signature"] == "BLEU|sig"
    assert verdict["gain_mean"] == pytest.approx(7 / 6)
    assert verdict["gain_sd"] == pytest.approx(0.5774, abs=1e-4)
    assert verdict["updates_ratio_mean"] == 0.5 and verdict["seconds_ratio_mean"] == 0.6
    assert "| 3 | 9.50 | 11.00 | +1.50 |" in table
    # one MoE run that never reaches the dense best: no mean ratio, the count instead
    logs["late"] = log([5.0, 7.0], [12.0, 24.0])
    pairs[1][1]["name"] = "late"
    table, verdict = study.final_table(pairs, lambda r: logs[r["name"]])
    assert verdict["unreached_seeds"] == 1 and verdict["updates_ratio_mean"] is None
    assert "| 2 of 3 reached | 2 of 3 reached |" in table


def test_a_runs_numbers_come_from_its_log():
    records = [
        '| train_inner | {"num_updates": "10", "wps": "1", "wpb": "9", "moe_drop": "0.2", "wall": "3"}',
        '| train_inner | {"num_updates": "20", "wps": "1", "wpb": "9", "moe_drop": "0.1", "wall": "6"}',
        '| valid | {"valid_nll_loss": "4.5", "valid_bleu": "3.25", "valid_num_updates": "20", '
        '"valid_epoch": "1", "valid_wps": "5"}',
        "| fairseq_cli.train | num. shared model params: 1,000 (num. trained: 1,000)",
        "| fairseq_cli.train | num. expert model params: 24 (num. trained: 24)",
    ]
    res = study.summarize_run("\n".join(records), study.moe_settings({}), moe=True)
    assert res["moe_drop"] == pytest.approx(0.15) and res["params"] == 1024
    assert res["best_valid_bleu"] == 3.25 and res["last_valid_nll"] == 4.5


def test_a_run_is_trained_again_only_for_another_command(tmp_path, monkeypatch):
    """A finished run with the same command is kept; another command (here: another
    budget) trains afresh, without the old run's checkpoint (fairseq would resume it)."""
    trained = []

    def fake_train(cmd, stdout, **kw):
        trained.append(cmd)
        return fake_run(stdout)

    monkeypatch.setattr(study.subprocess, "run", fake_train)
    a = study.parse_args(["--out", str(tmp_path), "--updates", "20", "--databin", "/d"])
    run = study.screen_runs([1])[1]
    run_dir = tmp_path / "runs" / "moe-s1"
    first = study.run_one(a, run, run_dir)
    (run_dir / "checkpoint_last.pt").write_bytes(b"old")
    assert study.run_one(a, run, run_dir)["best_valid_bleu"] == first["best_valid_bleu"] == 7
    assert len(trained) == 1
    a.updates = 30
    study.run_one(a, run, run_dir)
    assert len(trained) == 2 and not (run_dir / "checkpoint_last.pt").exists()
    assert trained[1][trained[1].index("--max-update") + 1] == "30"


def test_a_final_pair_trains_again_together(tmp_path, monkeypatch):
    """A changed recipe retrains the final's MoE run; its dense twin, whose command did not
    change, is trained again beside it, so that the pair's wall clocks stay comparable."""
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, stdout, **kw: fake_run(stdout))
    monkeypatch.setattr(study, "score_test", lambda a, run_dir: (10.0, "sig"))
    a = study.parse_args(["--out", str(tmp_path), "--updates", "20", "--databin", "/d"])
    (pair,) = study.final_pairs([1])
    for job in study.final_jobs(a, pair, tmp_path):
        assert job[3], "nothing finished yet: both trained"
        study.run_one(a, *job)
    assert not any(job[3] for job in study.final_jobs(a, pair, tmp_path)), "both reused"
    monkeypatch.setitem(recipes.TINY, "experts", 8)
    (pair,) = study.final_pairs([1])
    jobs = study.final_jobs(a, pair, tmp_path)
    dense, moe = [study.command(a, r, d) for r, d, _, _ in jobs]
    assert study.finished(jobs[0][1], dense) and not study.finished(jobs[1][1], moe)
    assert all(job[3] for job in jobs), "the dense run too, beside the new MoE run"


def fake_run(stdout):
    """A training that logs one validation, BLEU 7."""
    stdout.write(
        '| valid | {"valid_bleu": "7", "valid_num_updates": "20", "valid_epoch": "1", "valid_wps": "5"}\n'
    )
    return subprocess.CompletedProcess([], 0)


def test_the_screen_ranks_by_the_gain_over_dense_of_the_same_seed():
    def run(name, seed, bleu):
        return {
            "name": name,
            "seed": seed,
            "best_valid_bleu": bleu,
            "last_valid_nll": 4.0,
            "params": 1,
            "moe_drop": None,
            "seconds_per_update": 0.1,
        }

    results = [run("dense", 1, 22.0), run("dense", 2, 19.0), run("top2", 1, 21.0)]
    results += [run("top2", 2, 22.0), run("e8", 1, 22.8)]
    rows = study.screen_table(results).splitlines()[2:]
    # e8 ran on the easier seed only: the highest mean BLEU (22.8), but +0.8 over dense;
    # top2 gains -1 and +3, +1.0 on average
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["top2", "e8", "dense"]
    assert "| +1.00 ± 2.83 |" in rows[0] and "| +0.80 ± 0.00 |" in rows[1]
