# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The benchmark table is computed from fairseq's own log lines."""

from mt_run.compare import comparable_rows, summarize
from mt_run.fairseq_log import parse
from scripts.bench import markdown


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


def two_epoch_log(bleus):
    """30 updates over 2 epochs, logged every 10 (1 s each, cumulative ``wall``), validated
    at updates 10, 20, 30: fairseq's per-epoch ``train`` lines carry the cumulative wall
    clock (json ``train_wall``) and the epoch's training time (``train_train_wall``)."""
    lines = []
    for u in (10, 20, 30):
        lines.append(
            f'x | INFO | train_inner | {{"epoch": {1 + (u > 20)}, "loss": "9", "wps": "100", '
            f'"wpb": "100", "num_updates": "{u}", "train_wall": "10", "wall": "{u + u // 10}"}}'
        )
        lines.append(
            f'x | INFO | valid | {{"epoch": {1 + (u > 20)}, "valid_loss": "5", '
            f'"valid_bleu": "{bleus[u // 10 - 1]}", "valid_wps": "50", '
            f'"valid_num_updates": "{u}"}}'
        )
        if u in (20, 30):  # the end of each epoch
            lines.append(
                f'x | INFO | train | {{"epoch": {u // 10 - 1}, "train_wps": "99", '
                f'"train_wall": "{u + u // 10}", "train_train_wall": "{u}", '
                f'"train_num_updates": "{u}"}}'
            )
    return parse("\n".join(lines))


def test_seconds_per_update_counts_a_two_epoch_run_once():
    # 33 s of wall clock for 30 updates, whatever the number of epochs
    assert summarize(two_epoch_log([1.0, 2.0, 3.0]))["seconds_per_update"] == 33 / 30
    # a log without fairseq's wall clock: unknown, not 0
    no_wall = {**parse(log_text([1.0], [1, 2])), "train": []}  # (only train_inner's train_wall)
    assert summarize(no_wall)["seconds_per_update"] is None


def test_comparable_is_the_moes_best_bleu_as_in_the_reference():
    """The reference's mark: the MoE's best valid BLEU; each run's row, the first
    validation at which it comes within 0.1 BLEU of it, its BLEU, update and wall clock."""
    dense_log, moe_log = two_epoch_log([1.0, 2.95, 3.5]), two_epoch_log([2.0, 3.0, 2.5])
    dense, moe = comparable_rows(dense_log, moe_log)
    assert (moe["comparable_bleu"], moe["updates_to_comparable"]) == (3.0, 20)
    assert (dense["comparable_bleu"], dense["updates_to_comparable"]) == (2.95, 20)
    assert dense["seconds_to_comparable"] == moe["seconds_to_comparable"] == 22
    # a dense model that never gets there
    dense, _ = comparable_rows(two_epoch_log([1.0, 2.0, 2.5]), moe_log)
    assert dense["comparable_bleu"] is None and dense["updates_to_comparable"] is None
    table = markdown(
        {"dense": {**dense, "experts": "–"}, "moe": {**moe, "experts": 4}},
        {"hardware": "h", "settings": "s", "versions": "v", "date": "d"},
    )
    assert "| updates to comparable | – | 20 |" in table
    assert "| seconds to comparable | – | 22 |" in table


def test_the_versions_come_from_package_metadata_without_importing_them():
    """``make bench`` labels its table with the versions; importing fairseq for them set the
    root logger to DEBUG, and the plot that follows printed matplotlib's font search."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "from mt_run import report\n"
        "line = report.versions()\n"
        "assert 'fairseq' not in sys.modules and 'deepspeed' not in sys.modules, line\n"
        "assert logging.getLogger().level == logging.WARNING\n"
        "print(line)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("torch ") and ", fairseq " in out and ", deepspeed " in out
