# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""fairseq's training and generation logs, read once for every script and test.

fairseq logs a record per ``--log-interval`` updates (``train_inner``), one per
epoch (``train``) and one per validation (``valid``), in the format of
``--log-format``::

    json:   | train_inner | {"epoch": 1, "update": 0.2, "loss": "9.1", ..., "num_updates": "10"}
            | valid | {"epoch": 1, "valid_loss": "8.5", ..., "valid_num_updates": "57"}
    simple: | train_inner | epoch 001:     10 / 57 loss=9.1, ..., num_updates=10, ...
            | valid | epoch 001 | valid on 'valid' subset | loss 8.5 | ... | num_updates 57

``parse`` reads both into ``{"train_inner": [...], "train": [...], "valid": [...]}``:
one dict per record, keys without json's ``train_``/``valid_`` prefix, numbers as
floats. The other readers build on it, or read the few lines that are not
records (a resumed checkpoint, the training time, ``fairseq-generate``'s
"Translated" line, the plugin's "expert groups" line of each rank). ``python -m mt_run.fairseq_log summary LOG`` prints a run's
progress for bash (``scripts/demo.sh``).
"""

import argparse
import json
import re
import sys

KINDS = ("train_inner", "train", "valid")

_RECORD = re.compile(r"\| (train_inner|train|valid) \| (.*?)\s*$")
_INNER_PAIR = re.compile(r"([\w.]+)=([^,\s]+)")
_PIPE_PAIR = re.compile(r"([\w.]+) (\S+)")
_EPOCH = re.compile(r"^epoch (\d+)")
_LOADED = re.compile(r"Loaded checkpoint .* @ (\d+) updates")
_DONE = re.compile(r"done training in ([0-9.]+) seconds")
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")
_PARAMS = re.compile(r"num\. (?:shared|expert) model params: ([\d,]+)")
_GROUPS = re.compile(r"\| expert groups (\{.*\})\s*$")


def _value(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _record(kind, message):
    if message.startswith("{"):  # json
        return {
            (k[len(kind) + 1 :] if k.startswith(kind + "_") else k): _value(v)
            for k, v in json.loads(message).items()
        }
    rec = {}
    m = _EPOCH.match(message)
    if m:
        rec["epoch"] = float(m.group(1))
    if kind == "train_inner":  # "epoch 001:  10 / 57 loss=9.1, wps=3421.2, ..."
        pairs = _INNER_PAIR.findall(message)
    else:  # "epoch 001 | valid on 'valid' subset | loss 8.5 | ... | num_updates 57"
        pairs = [m.groups() for m in map(_PIPE_PAIR.fullmatch, message.split(" | ")[1:]) if m]
    rec.update((k, _value(v)) for k, v in pairs)
    return rec


def record(line):
    """One log line -> ``(kind, record)`` as :func:`parse` reads it, or None.

    Args:
        line: a line of the log.
    """
    m = _RECORD.search(line)
    return (m.group(1), _record(m.group(1), m.group(2))) if m else None


def parse(text):
    """A fairseq log (json or simple format) -> ``{kind: [record, ...]}``.

    Args:
        text: the log (other lines are ignored).

    Returns:
        dict with ``train_inner``, ``train`` and ``valid`` lists, in log order.
    """
    out = {kind: [] for kind in KINDS}
    for line in text.splitlines():
        found = record(line)
        if found:
            out[found[0]].append(found[1])
    return out


def losses_by_update(text):
    """``{num_updates: loss}`` of the ``train_inner`` records.

    Args:
        text: the log.
    """
    return {
        int(r["num_updates"]): r["loss"]
        for r in parse(text)["train_inner"]
        if "num_updates" in r and "loss" in r
    }


def wps(text, kind="train_inner", skip=0):
    """Words (target tokens) per second of the ``kind`` records, in log order.

    Args:
        text: the log.
        kind: ``train_inner`` (per interval), ``train`` (per epoch) or ``valid``.
        skip: leave out the first ``skip`` records (warm-up).
    """
    return [r["wps"] for r in parse(text)[kind] if "wps" in r][skip:]


def resumed_updates(text):
    """The updates of the checkpoint the run resumed from, or None."""
    found = _LOADED.findall(text)
    return int(found[-1]) if found else None


def training_seconds(text):
    """fairseq's "done training in S seconds", as the string it printed, or None."""
    found = _DONE.findall(text)
    return found[-1] if found else None


def model_params(text):
    """The model's parameters from fairseq-train's "num. shared model params" and
    "num. expert model params" lines, summed; None if absent."""
    found = [int(v.replace(",", "")) for v in _PARAMS.findall(text)]
    return sum(found) if found else None


def translated(text):
    """``fairseq-generate``'s last "Translated N sentences (M tokens) in S s" line.

    Returns:
        dict with ``sentences``, ``tokens`` (ints) and ``seconds``, or None.
    """
    found = _TRANSLATED.findall(text)
    if not found:
        return None
    sentences, tokens, seconds = found[-1]
    return {
        "sentences": int(sentences.replace(",", "")),
        "tokens": int(tokens.replace(",", "")),
        "seconds": float(seconds),
    }


def expert_groups(text):
    """The "expert groups" line each expert-parallel rank logs (``user/ds_moe.py``).

    Returns:
        ``{rank: {"rank", "node", "local_rank", "expert_parallel", "expert_data_parallel"}}``,
        the groups' ranks as lists, ``node`` and ``local_rank`` None where the launcher
        set no such variable.
    """
    found = {}
    for line in text.splitlines():
        m = _GROUPS.search(line)
        if m:
            rec = json.loads(m.group(1))
            found[rec["rank"]] = rec
    return found


def summary(text, records=None):
    """A training run's progress from its log.

    Args:
        text: the log.
        records: ``parse(text)``, when the caller has it already.

    Returns:
        dict: ``updates`` (the last update logged, else the resumed checkpoint's,
        else 0), ``resumed`` (the resumed checkpoint's updates, or None),
        ``trained`` (updates made by this run), ``seconds`` (fairseq's training
        time, as printed, or None) and ``rate`` (updates per second, two decimals,
        or None).
    """
    records = parse(text) if records is None else records
    logged = [r["num_updates"] for rs in records.values() for r in rs if "num_updates" in r]
    resumed = resumed_updates(text)
    updates = int(max(logged)) if logged else resumed or 0
    trained = updates - (resumed or 0)
    seconds = training_seconds(text)
    rate = f"{trained / float(seconds):.2f}" if seconds and trained > 0 else None
    return {
        "updates": updates,
        "resumed": resumed,
        "trained": trained,
        "seconds": seconds,
        "rate": rate,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mt_run.fairseq_log", description="Read a fairseq log."
    )
    p.add_argument(
        "what", choices=["summary"], help="summary: a training run's progress, name=value lines"
    )
    p.add_argument("log", help="the log file; - for stdin")
    args = p.parse_args(argv)
    if args.log == "-":
        text = sys.stdin.read()
    else:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    for key, value in summary(text).items():
        print(f"{key}={'' if value is None else value}")


if __name__ == "__main__":
    main()
