# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Train tokens/s of fairseq runs side by side, from their logs (``bash run.sh bench``).

    python -m mt_run.wps_table NAME LOG [NAME LOG ...]

One row per run: fairseq's ``wps`` over all updates (the ``train`` record at the
end of the epoch) and the median ``wps`` of the ``train_inner`` records from the
second on (without start-up; with ``--log-interval 1``, from update 2). When
there are two runs, the second's ratio to the first over all updates.
"""

import argparse
import statistics

from .fairseq_log import parse


def rows(logs):
    """``[(name, wps over all updates or None, median wps from the 2nd record or None)]``.

    Args:
        logs: ``[(name, log text), ...]``.
    """
    out = []
    for name, text in logs:
        log = parse(text)
        inner = [r["wps"] for r in log["train_inner"] if "wps" in r]
        total = [r["wps"] for r in log["train"] if "wps" in r]
        steady = statistics.median(inner[1:]) if len(inner) > 1 else None
        out.append((name, total[-1] if total else None, steady))
    return out


def table(rows):
    """The table's lines."""

    def fmt(v):
        return "-" if v is None else f"{v:,.0f}"

    lines = [f"{'model':<8}{'wps (all updates)':>20}{'wps (median, from update 2)':>30}"]
    lines += [f"{name:<8}{fmt(total):>20}{fmt(steady):>30}" for name, total, steady in rows]
    if len(rows) == 2 and rows[0][1] and rows[1][1]:
        lines.append(f"{rows[1][0]}/{rows[0][0]}: {rows[1][1] / rows[0][1]:.2f}x (all updates)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mt_run.wps_table", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("runs", nargs="+", metavar="NAME LOG")
    args = p.parse_args(argv)
    if len(args.runs) % 2:
        p.error("give NAME LOG pairs")
    logs = []
    for name, path in zip(args.runs[::2], args.runs[1::2]):
        with open(path, encoding="utf-8", errors="replace") as f:
            logs.append((name, f.read()))
    print("\n".join(table(rows(logs))))


if __name__ == "__main__":
    main()
