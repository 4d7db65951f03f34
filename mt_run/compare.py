# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Dense against MoE, from their training runs: one home for ``make bench`` and the study.

- ``train_command``: the ``user/train.py`` command of one comparison run: a recipe's
  settings, a fixed update budget, BLEU with beam search on part of the valid split
  every few updates, json logs;
- ``summarize`` / ``comparable_rows``: a run's row (tokens/s, best valid BLEU, seconds
  per update, the valid curve) from its parsed log (``mt_run.fairseq_log.parse``), and
  when a run first came within reach of a BLEU mark: update and wall clock.
"""

import json
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from mt_run import recipes

REPO = Path(__file__).resolve().parents[1]


def train_command(
    s: dict,
    moe: bool,
    *,
    databin: str,
    save_dir: str,
    updates: int,
    valid_interval: int,
    valid_steps: int,
    max_tokens: int,
    seed: int = 1,
    src: str = "en",
    tgt: str = "de",
    save: bool = False,
    gpu: bool = False,
    extra: Sequence[str] = (),
) -> list:
    """The ``user/train.py`` command of one run with recipe settings ``s``
    (``mt_run.recipes.settings``), dense or MoE: ``updates`` updates, validation (loss,
    and detokenized BLEU with the recipe's beam) on ``valid_steps`` batches of 64 valid
    sentences every ``valid_interval`` updates, json logs every 10 updates; with ``save``,
    ``checkpoint_last.pt`` (and the best by BLEU) in ``save_dir``, else nothing saved."""
    decoding = {k: s[k] for k in ("beam", "max_len_a", "max_len_b")}
    saving = ["--no-epoch-checkpoints"] if save else ["--no-save"]
    # fmt: off
    return [sys.executable, str(REPO / "user" / "train.py"), databin,
            *recipes.train_flags(s, moe=moe), "--source-lang", src, "--target-lang", tgt,
            "--max-tokens", str(max_tokens),
            "--max-update", str(updates), "--seed", str(seed), "--num-workers", "0",
            "--log-format", "json", "--log-interval", "10", "--no-progress-bar",
            "--validate-interval-updates", str(valid_interval), "--validate-interval", "1000",
            "--max-valid-steps", str(valid_steps), "--batch-size-valid", "64",
            "--eval-bleu", "--eval-bleu-args", json.dumps(decoding),
            "--eval-bleu-remove-bpe", "sentencepiece", "--eval-bleu-detok", "moses",
            "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
            "--save-dir", save_dir, *saving, *([] if gpu else ["--cpu"]), *extra]
    # fmt: on


#: A run is comparable once its valid BLEU comes within this much of the mark (the
#: reference's table counts dense's 36.12 as comparable to the MoE's 36.13).
COMPARABLE_WITHIN = 0.1


def wall_clock(log: dict, upto: float = float("inf")) -> Tuple[Optional[float], int]:
    """Seconds since the start of training at the last log record up to update ``upto``,
    and that record's update: fairseq's ``wall``, cumulative (the validations before that
    record included) in every ``train_inner`` and per-epoch ``train`` record. ``(None, 0)``
    when no record carries it."""
    at = [
        (v["wall"], int(v.get("num_updates", 0)))
        for v in log["train_inner"] + log["train"]
        if "wall" in v and v.get("num_updates", 0) <= upto
    ]
    return max(at, default=(None, 0))


def summarize(log: dict, comparable: float = None, within: float = COMPARABLE_WITHIN) -> dict:
    """One row of the table from a parsed log (``mt_run.fairseq_log.parse``); with a
    ``comparable`` BLEU mark, the first validation that came ``within`` BLEU of it: its
    BLEU, update and wall clock."""
    inner = log["train_inner"]
    steady = inner[1:] or inner  # the first interval includes start-up
    valid = [v for v in log["valid"] if "bleu" in v]
    best = max(valid, key=lambda v: v["bleu"]) if valid else {}
    row = {
        "updates": int(inner[-1]["num_updates"]) if inner else 0,
        "train_tokens_per_batch": _mean(v["wpb"] for v in steady),
        "train_tokens_per_sec": _mean(v["wps"] for v in steady),
        "valid_tokens_per_sec": _mean(v["wps"] for v in log["valid"]),
        "best_valid_bleu": best.get("bleu"),
        "updates_to_best": int(best["num_updates"]) if best else None,
        "epochs_to_best": int(best["epoch"]) if best else None,
        # the wall clock is cumulative: the last record's, not a sum over epochs
        "seconds_per_update": _per(*wall_clock(log)),
        "valid_curve": [
            (int(v["num_updates"]), v.get("bleu"), v.get("nll_loss", v.get("loss")))
            for v in log["valid"]
        ],
    }
    if comparable is not None:
        reached = next((v for v in valid if comparable - v["bleu"] <= within + 1e-9), None)
        row["comparable_bleu"] = reached["bleu"] if reached else None
        row["updates_to_comparable"] = int(reached["num_updates"]) if reached else None
        row["seconds_to_comparable"] = (
            wall_clock(log, reached["num_updates"])[0] if reached else None
        )
    return row


def comparable_rows(dense_log: dict, moe_log: dict, within: float = COMPARABLE_WITHIN):
    """The dense and MoE rows, with the reference's comparable mark: the MoE's best valid
    BLEU, and for each run the first validation within ``within`` BLEU of it (for the MoE,
    at the latest its best; the dense model may never get there)."""
    mark = summarize(moe_log)["best_valid_bleu"]
    return summarize(dense_log, mark, within), summarize(moe_log, mark, within)


def _per(seconds: Optional[float], updates: int) -> Optional[float]:
    return None if seconds is None or updates == 0 else seconds / updates


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None
