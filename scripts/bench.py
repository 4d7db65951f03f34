#!/usr/bin/env python3
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The "Expected results" table, dense vs MoE, produced from real runs (`make bench`).

    python scripts/bench.py [--databin DIR] [--out DIR] [--updates N] [--experts E]

Trains a dense Transformer and the same architecture with DeepSpeed MoE in
every encoder and decoder layer, with identical settings, for a fixed budget
of updates, validating (loss and detokenized BLEU with beam search) every
``--valid-interval`` updates. From the runs' own fairseq logs it writes
``bench.json``, ``bench.md`` (the table of the reference README: train tokens
per batch, train and validation tokens/s, best valid BLEU with its update and
epoch; as in the reference, the MoE's best BLEU as the comparable mark, and the
BLEU, update and wall-clock seconds at which each run first came within 0.1 BLEU
of it; experts; seconds per update, wall clock with validations) and
``bench.png`` (valid BLEU and loss against updates; tokens/s bars), labelled
with the hardware and settings. Defaults fit a CPU with the bundled demo
corpus; on GPUs pass the WMT databin and a larger model through ``--extra``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mt_run import compare, fairseq_log, recipes, report

REPO = Path(__file__).resolve().parents[1]
TINY = recipes.TINY  # the defaults: make demo's model


def bench_settings(args) -> dict:
    """The tiny recipe (``mt_run.recipes``) with this benchmark's sizes; the dense run:
    the same criterion without gate loss, its FFN as wide as the experts a token
    passes through."""
    return recipes.settings(
        "tiny",
        arch=args.arch,
        dim=args.dim,
        ffn=args.ffn,
        layers=args.layers,
        experts=args.experts,
        lr=args.lr,
        warmup=args.warmup,
        dense_criterion="model_and_base",
    )


def train_command(name: str, args, moe: bool) -> list:
    """The ``user/train.py`` command of one run, dense or MoE (``bench_settings``)."""
    return compare.train_command(
        bench_settings(args),
        moe,
        databin=args.databin,
        save_dir=str(Path(args.out) / name),
        updates=args.updates,
        valid_interval=args.valid_interval,
        valid_steps=args.valid_steps,
        max_tokens=args.max_tokens,
        src=args.src,
        tgt=args.tgt,
        gpu=args.gpu,
        extra=args.extra,
    )


def train(name: str, args, moe: bool) -> dict:
    cmd = train_command(name, args, moe)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"[bench] {name}: {args.updates} updates ...", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    (Path(args.out) / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} failed ({proc.returncode}); see {args.out}/{name}.log\n{proc.stderr[-2000:]}"
        )
    log = fairseq_log.parse(proc.stdout + proc.stderr)
    print(f"[bench] {name}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return log


def hardware(gpu: bool) -> str:
    if gpu:
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return f"CPU: {os.cpu_count()} cores, {report.cpu_name()}; OMP_NUM_THREADS={threads}"


def markdown(rows: dict, meta: dict) -> str:
    def f(v, fmt="{:.2f}"):
        return "–" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    cols = [
        ("train ntokens/batch", "train_tokens_per_batch", "{:.0f}"),
        ("train tokens/sec", "train_tokens_per_sec", "{:.0f}"),
        ("valid tokens/sec", "valid_tokens_per_sec", "{:.0f}"),
        ("best valid BLEU", "best_valid_bleu", "{:.2f}"),
        ("updates to best", "updates_to_best", "{}"),
        ("epochs to best", "epochs_to_best", "{}"),
        ("comparable valid BLEU", "comparable_bleu", "{:.2f}"),
        ("updates to comparable", "updates_to_comparable", "{}"),
        ("seconds to comparable", "seconds_to_comparable", "{:.0f}"),
        ("N experts", "experts", "{}"),
        ("seconds/update", "seconds_per_update", "{:.3f}"),
    ]
    lines = ["| | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for label, key, fmt in cols:
        lines.append(f"| {label} | " + " | ".join(f(r.get(key), fmt) for r in rows.values()) + " |")
    ratio = (rows["moe"]["train_tokens_per_sec"] or 0) / max(
        1e-9, rows["dense"]["train_tokens_per_sec"] or 0
    )
    lines += [
        "",
        f"MoE/dense train tokens/s: {ratio:.2f}×. {meta['hardware']}; {meta['settings']}; "
        f"{meta['versions']}; {meta['date']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in rows.items():
        curve = r["valid_curve"]
        axes[0].plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=name)
        axes[1].plot([c[0] for c in curve], [c[2] for c in curve], marker="o", label=name)
    axes[0].set(title="valid BLEU (detok.)", xlabel="updates")
    axes[1].set(title="valid nll loss", xlabel="updates")
    names = list(rows)
    axes[2].bar(
        names + [n + " (valid)" for n in names],
        [rows[n]["train_tokens_per_sec"] or 0 for n in names]
        + [rows[n]["valid_tokens_per_sec"] or 0 for n in names],
        color=["C0", "C1", "C0", "C1"],
    )
    axes[2].set(title="tokens/s (train; valid incl. beam search)")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"{meta['hardware']} | {meta['settings']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--databin", default=None, help="binarized data [the demo corpus, prepared if needed]"
    )
    p.add_argument("--workspace", default=str(REPO / "workspace"))
    p.add_argument("--out", default=None, help="output folder [WORKSPACE/bench]")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--arch", default=TINY["arch"])
    p.add_argument("--dim", type=int, default=TINY["dim"])
    p.add_argument("--ffn", type=int, default=TINY["ffn"])
    p.add_argument("--layers", type=int, default=TINY["layers"])
    p.add_argument("--experts", type=int, default=TINY["experts"])
    p.add_argument("--lr", type=float, default=TINY["lr"])
    p.add_argument("--warmup", type=int, default=TINY["warmup"])
    p.add_argument("--max-tokens", type=int, default=TINY["max_tokens_cpu"])
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--valid-interval", type=int, default=200)
    p.add_argument(
        "--valid-steps", type=int, default=4, help="validation batches (of 64 sentences)"
    )
    p.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    p.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="more fairseq options for both runs (last)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.databin is None:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "prepare_demo.py"),
                "--workspace",
                args.workspace,
            ],
            check=True,
            cwd=REPO,
        )
        args.databin = str(Path(args.workspace) / f"demo_{args.src}_{args.tgt}" / "databin")
    args.out = args.out or str(Path(args.workspace) / "bench")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    logs = {"dense": train("dense", args, moe=False), "moe": train("moe", args, moe=True)}
    dense, moe = compare.comparable_rows(logs["dense"], logs["moe"])
    rows = {"dense": dense, "moe": moe}
    rows["dense"]["experts"], rows["moe"]["experts"] = "–", args.experts
    s = bench_settings(args)
    meta = {
        "hardware": hardware(args.gpu),
        "settings": (
            f"{args.arch} d{args.dim}, {args.layers}+{args.layers} layers; MoE in every layer "
            f"enc+dec, {args.experts} experts of {args.ffn} top-{s['top_k']}, "
            f"{'dropless' if str(s['drop_tokens']) == '0' else 'tokens over capacity dropped'}"
            f"{'' if s['bias_balance'] is None else ', balancing bias ' + str(s['bias_balance'])}"
            f"; dense FFN {int(args.ffn) * int(s['top_k'])}; max-tokens "
            f"{args.max_tokens}, {args.updates} updates, valid every {args.valid_interval} "
            f"({args.valid_steps}x64 sentences, beam 4), data {args.databin}"
        ),
        # from package metadata: importing fairseq would set the root logger to DEBUG,
        # and matplotlib's font search would then print hundreds of lines
        "versions": report.versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench.md").write_text(markdown(rows, meta))
    plot(rows, meta, out / "bench.png")
    print((out / "bench.md").read_text())
    print(f"written: {out}/bench.json, bench.md, bench.png", file=sys.stderr)


if __name__ == "__main__":
    main()
