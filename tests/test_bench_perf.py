# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The pure pieces of ``scripts/bench_perf.py`` (``make bench-perf``): the memory
linearity check and the log parsing. No timing here: the benchmark itself
measures."""

from mt_run.fairseq_log import wps
from scripts.bench_perf import median, memory_fit


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
