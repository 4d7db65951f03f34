# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The quality study (``make study``, ``scripts/study.py``): the recipe's router settings
reach fairseq as the plugin's flags, every screened variant changes one thing of the
baseline MoE at the dense model's active FLOPs, and the verdict is computed from the
runs' logs. The study itself trains for an hour: not run here."""

import json

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


def test_each_variant_changes_one_thing_at_equal_active_flops():
    runs = study.runs_of("screen", [1, 2], [])
    assert len(runs) == 2 * len(study.SCREEN) and {r[3] for r in runs} == {1, 2}
    base = study.run_settings({})
    dense = study.run_settings(None)
    for name, moe, s, _seed, test in runs:
        assert not test
        if not moe:
            assert name == "dense" and s["ffn"] == base["ffn"]
            continue
        changed = {k for k in s if s[k] != base[k]}
        assert changed == set(study.SCREEN[name][1]), name
        assert s["ffn"] * s["top_k"] == dense["ffn"], name  # the dense FFN's FLOPs per token


def test_the_final_reuses_a_screened_run_with_the_recipes_settings(monkeypatch):
    runs = study.runs_of("all", [1], [1, 2, 3])
    final = [r for r in runs if r[4]]
    assert [(r[0], r[3]) for r in final if r[1]] == [(study._recipe_name(), s) for s in (1, 2, 3)]
    assert len([r for r in final if r[0] == "dense"]) == 3
    # seed 1's dense run is the screen's, once, scored on the test split
    assert len([r for r in runs if (r[0], r[3]) == ("dense", 1)]) == 1
    # a recipe no variant has: its own name
    monkeypatch.setitem(recipes.TINY, "experts", 6)
    assert study._recipe_name() == "recipe"


def row(curve, walls, bleu=None):
    """A run's numbers as ``summarize_run`` gives them: valid BLEU at updates, wall clock."""
    best = max(curve, key=lambda c: c[1])
    return {
        "valid_curve": [(u, b, 1.0) for u, b in curve],
        "wall_curve": walls,
        "best_valid_bleu": best[1],
        "updates_to_best": best[0],
        "test_bleu": bleu,
    }


def test_reach_is_the_first_validation_at_the_dense_best():
    dense = row([(200, 5.0), (400, 8.0), (600, 7.5)], [(200, 10.0), (400, 20.0), (600, 30.0)])
    moe = row([(200, 6.0), (400, 8.0), (600, 9.0)], [(200, 12.0), (400, 26.0), (600, 36.0)])
    assert study.reach(moe, dense) == (1.0, 1.3)
    faster = row([(200, 8.1), (400, 9.0)], [(200, 11.0), (400, 22.0)])
    assert study.reach(faster, dense) == (0.5, 0.55)
    never = row([(200, 1.0), (400, 7.9)], [(200, 11.0), (400, 22.0)])
    assert study.reach(never, dense) == (None, None)


def test_final_verdict_from_the_runs():
    curve = [(200, 5.0), (400, 8.0)]
    walls = [(200, 10.0), (400, 20.0)]
    runs = []
    for seed, (d, m) in enumerate([(10.0, 11.5), (10.5, 11.0), (9.5, 11.0)], 1):
        runs.append({**row(curve, walls, d), "name": "dense", "seed": seed, "test_signature": "s"})
        runs.append({**row(curve, walls, m), "name": "e8", "seed": seed, "test_signature": "s"})
    table, verdict = study.final_table(runs)
    assert verdict["seeds"] == [1, 2, 3] and verdict["moe_name"] == "e8"
    assert verdict["gain_mean"] == pytest.approx(1.1667, abs=1e-4)
    assert verdict["gain_sd"] == pytest.approx(0.5774, abs=1e-4)
    assert verdict["updates_ratio_mean"] == 1.0 and verdict["unreached_seeds"] == 0
    assert "| 3 | 9.50 | 11.00 | +1.50 |" in table


def test_a_runs_numbers_come_from_its_log():
    records = [
        '| train_inner | {"num_updates": "10", "wps": "1", "wpb": "9", "moe_drop": "0.2", "wall": "3"}',
        '| train_inner | {"num_updates": "20", "wps": "1", "wpb": "9", "moe_drop": "0.1", "wall": "6"}',
        '| valid | {"valid_nll_loss": "4.5", "valid_bleu": "3.25", "valid_num_updates": "20", '
        '"valid_epoch": "1", "valid_wps": "5"}',
        "| fairseq_cli.train | num. shared model params: 1,000 (num. trained: 1,000)",
        "| fairseq_cli.train | num. expert model params: 24 (num. trained: 24)",
    ]
    res = study.summarize_run("\n".join(records), study.run_settings({}), moe=True)
    assert res["moe_drop"] == pytest.approx(0.15) and res["params"] == 1024
    assert res["best_valid_bleu"] == 3.25 and res["last_valid_nll"] == 4.5
    assert res["wall_curve"] == [(10, 3.0), (20, 6.0)]
