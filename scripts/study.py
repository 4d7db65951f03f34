#!/usr/bin/env python3
# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""What makes the MoE beat its dense twin on the demo corpus (``make study``).

    python scripts/study.py [--stage screen|final|all] [--jobs 2] [--out DIR]

Every run is ``make demo``'s model and budget (the tiny recipe, ``mt_run.recipes``:
2000 updates of 1024 tokens), trained by ``user/train.py`` with BLEU (beam 4) on 512
valid sentences every 200 updates (``mt_run.compare.train_command``), one thread a run,
``--jobs`` runs at a time.

- ``screen``: the dense twin and the old MoE recipe (4 experts, top-1, capacity factor
  1.0, gate-loss weight 0.01), and variants that change one thing of that MoE:
  capacity factor 1.25, dropless training, router z-loss, expert output masking, top-2
  (experts half as wide), 8 and 16 experts, gate-loss weight 0.001 and 0.1. Every
  variant has the dense model's active FLOPs per token. Selected on the valid split:
  best valid BLEU and the last valid loss, ``--screen-seeds`` seeds.
- ``final``: the recipe as it now stands (the chosen settings) against the dense twin,
  ``--final-seeds`` seeds (3), each run scored once on the test split (all 1000
  sentences, ``make demo``'s decoding, detokenized sacreBLEU with its signature); the
  targets of issue 16: MoE >= dense + 1.0 test BLEU (mean over seeds), and the MoE
  reaching the dense run's best valid BLEU in <= 0.6x its updates and <= 0.7x its
  wall-clock time (the two runs of a seed train side by side, so they share the load).

A finished run is not run again (its ``result.json``); ``--out`` keeps every run's
fairseq log. Written there: ``study.md`` (the tables) and ``study.json`` (every number).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mt_run import compare, fairseq_log, recipes

REPO = Path(__file__).resolve().parents[1]
UPDATES = recipes.TINY["max_update"]
VALID_INTERVAL = 200
VALID_STEPS = 8  # x 64 sentences

#: The MoE every screened variant changes one thing of: the tiny recipe's MoE before
#: this study. Every key a variant changes is set here, so the screen means the same
#: whatever the recipe's defaults are now.
BASELINE = {
    "experts": 4,
    "top_k": 1,
    "ffn": 256,
    "capacity_factor": None,  # the plugin's 1.0
    "drop_tokens": 1,
    "z_loss_weight": None,
    "eom": None,
    "gate_weight": 0.01,
}

#: name -> (what it changes, recipe overrides; None: the dense twin)
SCREEN = {
    "dense": ("the dense twin (one FFN of 256 a layer)", None),
    "moe": ("4 experts top-1, capacity factor 1.0, gate loss 0.01", {}),
    "cap1.25": ("capacity factor 1.25", {"capacity_factor": 1.25}),
    "dropless": ("no token dropped in training", {"drop_tokens": 0}),
    "zloss": ("router z-loss, weight 1e-3", {"z_loss_weight": 0.001}),
    "eom0.2": ("expert output masking 0.2", {"eom": 0.2}),
    "top2": ("top-2 of experts half as wide (128)", {"top_k": 2, "ffn": 128}),
    "e8": ("8 experts", {"experts": 8}),
    "e16": ("16 experts", {"experts": 16}),
    "gate0.001": ("gate-loss weight 0.001", {"gate_weight": 0.001}),
    "gate0.1": ("gate-loss weight 0.1", {"gate_weight": 0.1}),
}

#: target of issue 16 on the test split (mean over seeds), and the reach targets
TARGET_BLEU_GAIN, TARGET_UPDATES, TARGET_SECONDS = 1.0, 0.6, 0.7

_PARAMS = re.compile(r"num\. (shared|expert) model params: ([\d,]+)")
_BLEU = re.compile(r"= ([\d.]+) ")


def run_settings(overrides):
    """The recipe settings of a run: the dense twin (``None``) or the MoE baseline with
    ``overrides``; ``"recipe"``: the tiny recipe as it stands."""
    base = {"dense_criterion": "model_and_base"}  # the MoE's criterion, no gate loss
    if overrides == "recipe" or overrides is None:
        return recipes.settings("tiny", **base)
    return recipes.settings("tiny", **{**base, **BASELINE, **overrides})


def runs_of(stage, screen_seeds, final_seeds):
    """``[(name, moe, settings, seed, scored_on_test)]`` of a stage, in the order they
    start (a seed's dense and MoE runs next to each other). A final run with the
    settings of a screened variant takes that variant's name (and its run)."""
    out = []
    if stage in ("screen", "all"):
        for seed in screen_seeds:
            for name, (_, over) in SCREEN.items():
                out.append((name, over is not None, run_settings(over), seed, False))
    if stage in ("final", "all"):
        for seed in final_seeds:
            out.append(("dense", False, run_settings(None), seed, True))
            out.append((_recipe_name(), True, run_settings("recipe"), seed, True))
    merged = {}
    for name, moe, s, seed, test in out:  # a run in both stages: once, scored if final
        key = (name, seed)
        merged[key] = (name, moe, s, seed, test or merged.get(key, (0, 0, 0, 0, False))[4])
    return list(merged.values())


def _recipe_name():
    """The screened variant whose settings the recipe has now, else ``recipe``."""
    recipe = run_settings("recipe")
    same = (n for n, (_, o) in SCREEN.items() if o is not None and run_settings(o) == recipe)
    return next(same, "recipe")


def params(text):
    """The model's parameter count from a fairseq-train log (its shared and expert
    parameters); None if absent."""
    found = [int(v.replace(",", "")) for _, v in _PARAMS.findall(text)]
    return sum(found) if found else None


def summarize_run(text, s, moe):
    """The numbers of one run from its log."""
    log = fairseq_log.parse(text)
    row = compare.summarize(log)
    valid = log["valid"]
    drops = [r["moe_drop"] for r in log["train_inner"] if "moe_drop" in r]
    return {
        "best_valid_bleu": row["best_valid_bleu"],
        "updates_to_best": row["updates_to_best"],
        "last_valid_nll": valid[-1].get("nll_loss") if valid else None,
        "seconds_per_update": row["seconds_per_update"],
        "train_tokens_per_sec": row["train_tokens_per_sec"],
        "updates": row["updates"],
        "moe_drop": statistics.mean(drops) if drops else None,
        "params": params(text),
        "valid_curve": row["valid_curve"],
        "wall_curve": [
            (int(r["num_updates"]), r["wall"]) for r in log["train_inner"] if "wall" in r
        ],
        "experts": s["experts"] if moe else None,
        "top_k": s["top_k"] if moe else None,
    }


def score_test(a, run_dir):
    """``make demo``'s translation of the test split with the run's last checkpoint,
    scored with detokenized sacreBLEU: ``(bleu, signature line)``."""
    s = recipes.TINY
    gen = run_dir / "generate-test.txt"
    # fmt: off
    cmd = [sys.executable, str(REPO / "user" / "generate.py"), a.databin,
           "--task", "translation_deepspeed", "--source-lang", "en", "--target-lang", "de",
           "--path", str(run_dir / "checkpoint_last.pt"), "--gen-subset", "test",
           "--beam", str(s["beam"]), "--lenpen", str(s["lenpen"]),
           "--max-len-a", str(s["max_len_a"]), "--max-len-b", str(s["max_len_b"]),
           "--max-tokens", "8000", "--bpe", "sentencepiece",
           "--sentencepiece-model", str(Path(a.databin) / "spm.model"),
           "--num-workers", "0", "--cpu"]
    # fmt: on
    with open(gen, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.DEVNULL, env=env(), check=True)
    ref = Path(a.databin).parent / "raw" / "test.de"
    line = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_to_text.py"), str(gen), str(ref), "en", "de"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return float(_BLEU.search(line).group(1)), line


def env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_one(a, run):
    """Train one run (unless its ``result.json`` exists) and, for the final comparison,
    score it on the test split; its numbers."""
    name, moe, s, seed, test = run
    run_dir = Path(a.out) / "runs" / f"{name}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        res = json.loads(done.read_text())
        if not test or "test_bleu" in res:
            return res
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = compare.train_command(
            s,
            moe,
            databin=a.databin,
            save_dir=str(run_dir),
            updates=a.updates,
            valid_interval=VALID_INTERVAL,
            valid_steps=VALID_STEPS,
            max_tokens=s["max_tokens_cpu"],
            seed=seed,
            save=True,
        )
        print(f"[study] {name} seed {seed}: training", file=sys.stderr, flush=True)
        t0 = time.time()
        with open(run_dir / "train.log", "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed; see {run_dir / 'train.log'}")
        res = {"name": name, "moe": moe, "seed": seed, "settings": s, "command": cmd}
        res.update(summarize_run((run_dir / "train.log").read_text(), s, moe))
        print(
            f"[study] {name} seed {seed}: best valid BLEU {res['best_valid_bleu']} "
            f"({time.time() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if test:
        res["test_bleu"], res["test_signature"] = score_test(a, run_dir)
    done.write_text(json.dumps(res, indent=1))
    return res


def reach(moe_row, dense_row):
    """When the MoE run first reached the dense run's best valid BLEU: its updates and
    wall clock over the dense run's to that best; ``(None, None)`` if it never did."""
    mark, at = dense_row["best_valid_bleu"], dense_row["updates_to_best"]
    hit = next((u for u, b, _ in moe_row["valid_curve"] if b is not None and b >= mark), None)
    if hit is None or not at:
        return None, None

    def wall(row, u):
        return max((w for n, w in row["wall_curve"] if n <= u), default=None)

    d, m = wall(dense_row, at), wall(moe_row, hit)
    return hit / at, (m / d if d and m else None)


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(v, f="{:.2f}"):
    return "–" if v is None else f.format(v)


def screen_table(results):
    by = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    lines = [
        "| variant | what | seeds | params | best valid BLEU | last valid "
        "nll | dropped | s/update |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(by, key=lambda n: -(mean_sd(r["best_valid_bleu"] for r in by[n])[0] or 0))
    for name in ranked:
        rows = by[name]
        bleu, sd = mean_sd(r["best_valid_bleu"] for r in rows)
        nll, _ = mean_sd(r["last_valid_nll"] for r in rows)
        drop, _ = mean_sd(r["moe_drop"] for r in rows)
        spu, _ = mean_sd(r["seconds_per_update"] for r in rows)
        p = rows[0]
        size = fmt(p["params"], "{:,}")
        what = SCREEN[name][0] if name in SCREEN else "the recipe"
        lines.append(
            f"| {name} | {what} | {','.join(str(r['seed']) for r in rows)} | {size} | "
            f"{fmt(bleu)} ± {fmt(sd)} | {fmt(nll, '{:.3f}')} | {fmt(drop, '{:.1%}')} | "
            f"{fmt(spu, '{:.3f}')} |"
        )
    return "\n".join(lines)


def final_table(results):
    """Per seed and mean ± sd: test BLEU of dense and MoE, and the MoE's reach."""
    dense = {r["seed"]: r for r in results if r["name"] == "dense" and "test_bleu" in r}
    moe = {r["seed"]: r for r in results if r["name"] != "dense" and "test_bleu" in r}
    seeds = sorted(set(dense) & set(moe))
    lines = [
        "| seed | dense test BLEU | MoE test BLEU | gain | dense best valid BLEU (update) | "
        "MoE best valid BLEU (update) | MoE updates to dense's best | MoE time to dense's best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cols = {k: [] for k in ("d", "m", "gain", "u", "t")}
    for s in seeds:
        d, m = dense[s], moe[s]
        u, t = reach(m, d)
        gain = m["test_bleu"] - d["test_bleu"]
        for k, v in zip(cols, (d["test_bleu"], m["test_bleu"], gain, u, t)):
            cols[k].append(v)
        lines.append(
            f"| {s} | {d['test_bleu']:.2f} | {m['test_bleu']:.2f} | {gain:+.2f} | "
            f"{fmt(d['best_valid_bleu'])} ({d['updates_to_best']}) | "
            f"{fmt(m['best_valid_bleu'])} ({m['updates_to_best']}) | {fmt(u, '{:.2f}×')} | "
            f"{fmt(t, '{:.2f}×')} |"
        )
    stats = {k: mean_sd(v) for k, v in cols.items()}
    lines.append(
        "| mean ± sd | "
        + " | ".join(
            f"{fmt(stats[k][0], '{:+.2f}' if k == 'gain' else '{:.2f}')} ± {fmt(stats[k][1])}"
            for k in ("d", "m", "gain")
        )
        + " | | | "
        + " | ".join(f"{fmt(stats[k][0], '{:.2f}×')}" for k in ("u", "t"))
        + " |"
    )
    unreached = sum(v is None for v in cols["u"])
    verdict = {
        "seeds": seeds,
        "moe_name": next(iter(moe.values()))["name"] if moe else None,
        "gain_mean": stats["gain"][0],
        "gain_sd": stats["gain"][1],
        "updates_ratio_mean": None if unreached else stats["u"][0],
        "seconds_ratio_mean": None if unreached else stats["t"][0],
        "unreached_seeds": unreached,
        "signature": next(iter(dense.values()))["test_signature"] if dense else None,
    }
    return "\n".join(lines), verdict


def write(a, results, stage):
    out = Path(a.out)
    parts = [f"# MoE vs dense on the demo corpus ({time.strftime('%Y-%m-%d')})", ""]
    screen = [r for r in results if r["seed"] in a.screen_seeds and r["name"] in SCREEN]
    if stage in ("screen", "all") and screen:
        parts += ["## Screen (valid split)", "", screen_table(screen), ""]
    verdict = None
    if stage in ("final", "all"):
        table, verdict = final_table(results)
        g, sd = verdict["gain_mean"], verdict["gain_sd"]
        u, t = verdict["updates_ratio_mean"], verdict["seconds_ratio_mean"]
        parts += [
            f"## Final: the recipe ({verdict['moe_name']}) against the dense twin, "
            f"{len(verdict['seeds'])} seeds",
            "",
            table,
            "",
            f"Test BLEU gain {fmt(g, '{:+.2f}')} ± {fmt(sd)} (target ≥ +{TARGET_BLEU_GAIN}); "
            f"updates to dense's best {fmt(u, '{:.2f}×')} (target ≤ {TARGET_UPDATES}×), "
            f"wall clock {fmt(t, '{:.2f}×')} (target ≤ {TARGET_SECONDS}×)"
            + (
                f"; {verdict['unreached_seeds']} MoE run(s) never reached dense's best"
                if verdict["unreached_seeds"]
                else ""
            )
            + ".",
            "",
            f"sacreBLEU: {verdict['signature']}",
            "",
        ]
    parts.append(
        f"{UPDATES if a.updates is None else a.updates} updates a run, BLEU every "
        f"{VALID_INTERVAL} updates on {VALID_STEPS * 64} valid sentences (beam 4); one thread "
        f"a run, {a.jobs} at a time; {os.cpu_count()} cores."
    )
    (out / "study.md").write_text("\n".join(parts) + "\n")
    (out / "study.json").write_text(json.dumps({"runs": results, "verdict": verdict}, indent=1))
    print((out / "study.md").read_text())


def seeds(text):
    return [int(s) for s in text.split(",") if s]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("screen", "final", "all"), default="all")
    p.add_argument("--databin", default=str(REPO / "workspace" / "demo_en_de" / "databin"))
    p.add_argument("--out", default=str(REPO / "workspace" / "study"))
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--screen-seeds", type=seeds, default=[1])
    p.add_argument("--final-seeds", type=seeds, default=[1, 2, 3])
    p.add_argument("--updates", type=int, default=UPDATES, help="updates a run")
    p.add_argument("--only", default=None, help="comma-separated screen variants (default: all)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if not (Path(a.databin) / "dict.en.txt").exists():
        sys.exit(
            f"study: no demo corpus in {a.databin} (--databin): prepare it with "
            "`python scripts/prepare_demo.py`, or run `make study`"
        )
    Path(a.out).mkdir(parents=True, exist_ok=True)
    runs = runs_of(a.stage, a.screen_seeds, a.final_seeds)
    if a.only:
        keep = set(a.only.split(","))
        runs = [r for r in runs if r[0] in keep]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda r: run_one(a, r), runs))
    write(a, results, a.stage)


if __name__ == "__main__":
    main()
