# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The pure pieces of ``scripts/bench_perf.py`` (``make bench-perf``): the memory
linearity check, the log parsing and the tables; and that the ``dist`` worker still
returns every variant it times (one update on a tiny model). No timing here: the
benchmark itself measures."""

import pytest

from mt_run.fairseq_log import wps
from scripts.bench_perf import (
    dist_section,
    median,
    memory_fit,
    parse_args,
    passthrough,
    run_dist_worker,
    scale_progress,
    scale_rows,
    write_scale,
)


def test_memory_fit_calls_linear_growth_linear():
    ns = [1024, 2048, 4096, 8192]
    fit = memory_fit(ns, [5e6 + 7400 * n for n in ns])
    assert fit["linear"] is True
    assert abs(fit["bytes_per_token"] - 7400) < 1


def test_memory_fit_catches_a_dispatch_that_grows_with_tokens_squared():
    # a dense tokens x experts x capacity one-hot: capacity grows with tokens
    ns = [1024, 2048, 4096, 8192]
    fit = memory_fit(ns, [5e6 + 7400 * n + 8 * 4 * n * (n / 8) for n in ns])
    assert fit["linear"] is False and fit["quadratic_share"] > 0.5


def test_parse_wps_skips_warmup_lines():
    log = "\n".join(
        f"2026-11-25 | INFO | train_inner | epoch 001: {i} / 9 loss=9.1, wps={w}, ups=1.0"
        for i, w in enumerate([100.0, 2000.5, 2100.0, 1900.0], 1)
    )
    assert wps(log, skip=1) == [2000.5, 2100.0, 1900.0]
    assert median(wps(log, skip=1)) == 2000.5


def scale_results():
    """Results of ``bench_perf.py --parts scale`` at W = 1, 2 (synthetic numbers)."""
    w1 = {"dense_wps_median": 2000.0, "moe_wps_median": 1900.0, "moe_ratio": 0.95}
    w2 = {"dense_wps_median": 3000.0, "moe_wps_median": 2700.0, "moe_ratio": 0.9}
    w2["valid"] = {"dense_wps_total": 7000.0, "moe_wps_total": 4200.0, "moe_ratio": 0.6}
    w2["generate"] = {"dense_tps_total": 1000.0, "moe_tps_total": 500.0, "moe_ratio": 0.5}
    w2["valid"]["moe_buffers_ratio"], w2["generate"]["moe_buffers_ratio"] = 0.4, 0.3
    w2.update(moe_dropless_wps_median=2500.0, moe_dropless_ratio=0.85)
    w2.update(moe_dropless_buffers_wps_median=2000.0, moe_dropless_buffers_ratio=0.7)
    for r in (w1, w2):
        r.update(load_start="1.0 1.0 1.0", load_end="2.0 1.5 1.0")
    return {"worlds": {"2": w2, "1": w1}}


def test_scale_table_has_a_row_per_world_with_its_ratios(tmp_path):
    a = parse_args(["--out", str(tmp_path)])
    info = {"cpu": "CPU X", "cores": 2, "omp_threads": "1", "versions": {"torch": "2"}}
    info.update(load_start="1.0 1.0 1.0", load_end="2.0 1.5 1.0")
    rows = scale_rows(scale_results())
    assert [r["W"] for r in rows] == [1, 2]
    assert rows[0]["valid_ratio"] is None and rows[1]["beam_moe"] == 500.0
    lines = write_scale(a, scale_results(), info)
    assert "**2 cores**" in lines[0]
    assert lines[-2].startswith("| 1 | 2,000 | 1,900 | 0.95 | – | – | – |")
    assert lines[-1].startswith(
        "| 2 | 3,000 | 2,700 | 0.90 | 2,500 | 0.85 (0.70) | 7,000 | 4,200 | 0.60 (0.40) "
        "| 1,000 | 500 | 0.50 (0.30) |"
    )
    assert (tmp_path / "scale.md").read_text().splitlines() == lines
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_dropless_training_is_reported_both_ways():
    w2 = scale_results()["worlds"]["2"]
    w2.update(seconds=1.0, moe_dropless_vs_buffers=1.2)
    assert "dropless 0.85x (buffer path 0.70x)" in scale_progress(2, w2)
    lines = dist_section(parse_args([]), {**w2, "updates": 3, "valid": None})
    assert "moe_dropless 2500 (0.85x)   moe_dropless_buffers 2000 (0.70x)" in lines[1]
    assert "exchange / buffers 1.20x" in lines[2]


def test_dist_dropless_is_on_by_default_and_reaches_the_worker():
    assert parse_args([]).dist_dropless
    assert parse_args(passthrough(parse_args([]))).dist_dropless
    off = parse_args(["--no-dist-dropless"])
    assert not parse_args(passthrough(off)).dist_dropless


@pytest.mark.timeout(180)
def test_dist_worker_times_dropless_training_on_the_exchange_and_the_buffers(tiny_data, tmp_path):
    """Two processes, expert parallel: one update of each variant on a tiny model."""
    # fmt: off
    a = parse_args(["--databin", str(tiny_data["databin"]), "--out", str(tmp_path),
                    "--dim", "16", "--ffn", "32", "--layers", "1", "--heads", "2",
                    "--experts", "2", "--dist-max-tokens", "256", "--dist-updates", "1",
                    "--warmup", "0", "--timeout", "150"])
    # fmt: on
    r = run_dist_worker(a, 2, "dist_worker", valid=False, generate=False)
    for name in ("dense", "moe", "moe_dropless", "moe_dropless_buffers"):
        assert len(r[f"{name}_step_s"]) == 1, name
    assert {"moe_ratio", "moe_dropless_ratio", "moe_dropless_buffers_ratio"} <= set(r)
    assert r["moe_dropless_vs_buffers"] > 0
    # each variant took its path in every layer: capacity (dropping); the exchange; the
    # buffers at the capacity the ranks agree on, even for batches below exact_fit_min_tokens
    assert r["moe_paths"] == ["capacity"]
    assert r["moe_dropless_paths"] == ["exchange"]
    assert r["moe_dropless_buffers_paths"] == ["agreed"]
