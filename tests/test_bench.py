# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The benchmark table is computed from fairseq's own log lines."""

from mt_run.fairseq_log import parse
from scripts.bench import markdown, summarize


def log_text(bleus, wps):
    lines = []
    for i, w in enumerate(wps, 1):
        lines.append(
            f'x | INFO | train_inner | {{"epoch": 1, "loss": "9", "wps": "{w}", "wpb": "100", '
            f'"num_updates": "{10 * i}", "train_wall": "1"}}'
        )
    for i, b in enumerate(bleus, 1):
        lines.append(
            f'x | INFO | valid | {{"epoch": {i}, "valid_loss": "5", "valid_nll_loss": "4", '
            f'"valid_bleu": "{b}", "valid_wps": "50", "valid_num_updates": "{10 * i}"}}'
        )
    lines.append(
        'x | INFO | train | {"epoch": 3, "train_wps": "99", "train_wall": "30", "train_num_updates": "30"}'
    )
    return "\n".join(lines)


def test_rows_come_from_the_logs():
    dense = parse(log_text([1.0, 3.0, 2.0], [500, 200, 400]))
    moe = parse(log_text([0.5, 2.5, 3.5], [400, 100, 300]))
    assert dense["valid"][0]["bleu"] == 1.0 and dense["train"][0]["wall"] == 30.0
    d = summarize(dense)
    assert d["best_valid_bleu"] == 3.0 and d["updates_to_best"] == 20 and d["epochs_to_best"] == 2
    assert d["train_tokens_per_sec"] == 300  # the first interval (start-up) is left out
    assert d["seconds_per_update"] == 1.0 and d["valid_tokens_per_sec"] == 50
    m = summarize(moe, comparable=d["best_valid_bleu"])
    assert m["updates_to_comparable"] == 30 and m["best_valid_bleu"] == 3.5
    never = summarize(parse(log_text([1.0], [1, 2])), comparable=3.0)
    assert never["updates_to_comparable"] is None
    table = markdown(
        {"dense": {**summarize(dense, 3.0), "experts": "–"}, "moe": {**m, "experts": 4}},
        {"hardware": "h", "settings": "s", "versions": "v", "date": "d"},
    )
    assert (
        "| best valid BLEU | 3.00 | 3.50 |" in table
        and "| updates to comparable | 20 | 30 |" in table
    )
    assert "MoE/dense train tokens/s: 0.67×" in table
