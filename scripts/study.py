#!/usr/bin/env python3
# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""What makes the MoE beat its dense twin on the demo corpus (``make study``).

    python scripts/study.py [--stage screen|final|all] [--jobs N] [--out DIR]

Every run is ``make demo``'s model and budget (the tiny recipe, ``mt_run.recipes``:
2000 updates of 1024 tokens), trained by ``user/train.py`` with BLEU (beam 4) on 512
valid sentences every 200 updates (``mt_run.compare.train_command``), one thread a run,
``--jobs`` runs at a time (default: one a core).

- ``screen``: the dense twin and the old MoE recipe (4 experts, top-1, capacity factor
  1.0, gate-loss weight 0.01), variants that change one thing of that MoE:
  capacity factor 1.25, dropless training, router z-loss, expert output masking, expert
  dropout, top-2 (experts half as wide), 8 and 16 experts, gate-loss weight 0.001 and
  0.1; three combinations of the changes that did best on seed 1, and the chosen one
  with expert dropout or the balancing bias (with and without the gate loss). Every
  variant has the dense model's active FLOPs per token. Selected on the valid split: a variant's best valid
  BLEU minus the dense run's of the same seed, averaged over ``--screen-seeds`` (1, 2),
  with the last valid loss beside it.
- ``final``: the recipe as it now stands (the chosen settings) against the dense twin,
  ``--final-seeds`` seeds (3), each run scored once on the test split (all 1000
  sentences, ``make demo``'s decoding, detokenized sacreBLEU with its signature); the
  targets of issue 16: MoE >= dense + 1.0 test BLEU (mean over seeds), and the MoE
  reaching the dense run's best valid BLEU in <= 0.6x its updates and <= 0.7x its
  wall-clock time. A seed's two runs start together and train side by side, so they
  share the machine's load; they are trained for the final, not taken from the screen.

A run whose ``result.json`` holds the same command (but for the interpreter and the
folder) is not trained again; any other run starts afresh in its folder
(``runs/<variant>-s<seed>``, ``final/{dense,moe}-s<seed>``); a final pair is trained
again together when either of its runs is (their wall clocks are compared). Written to
``--out``: ``study.md`` (the tables) and ``study.json`` (every number). A failed run is named at
the end (exit status 1), after the tables of the runs that finished.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mt_prep import bleu
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
    "expert_dropout": None,
    "bias_balance": None,
    "gate_weight": 0.01,
}

#: name -> (what it changes, overrides of BASELINE; None: BASELINE's dense twin, whose
#: FFN is as wide as the experts a token passes through: ``recipes.train_flags``)
SCREEN = {
    "dense": ("the dense twin (one FFN of 256 a layer)", None),
    "moe": ("4 experts top-1, capacity factor 1.0, gate loss 0.01", {}),
    "cap1.25": ("capacity factor 1.25", {"capacity_factor": 1.25}),
    "dropless": ("no token dropped in training", {"drop_tokens": 0}),
    "zloss": ("router z-loss, weight 1e-3", {"z_loss_weight": 0.001}),
    "eom0.2": ("expert output masking 0.2", {"eom": 0.2}),
    "expdrop0.1": ("expert dropout 0.1", {"expert_dropout": 0.1}),
    "top2": ("top-2 of experts half as wide (128)", {"top_k": 2, "ffn": 128}),
    "e8": ("8 experts", {"experts": 8}),
    "e16": ("16 experts", {"experts": 16}),
    "gate0.001": ("gate-loss weight 0.001", {"gate_weight": 0.001}),
    "gate0.1": ("gate-loss weight 0.1", {"gate_weight": 0.1}),
    # combinations of the single changes that did best on seed 1
    "top2-dropless": (
        "top-2 (128 wide), dropless",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0},
    ),
    "top2-dropless-e8": (
        "top-2 of 8 experts (128 wide), dropless",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0, "experts": 8},
    ),
    "top2-dropless-gate0.001": (
        "top-2 (128 wide), dropless, gate-loss weight 0.001",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0, "gate_weight": 0.001},
    ),
    # the chosen recipe with expert dropout (added after the choice)
    "top2-dropless-expdrop0.1": (
        "top-2 (128 wide), dropless, expert dropout 0.1",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0, "expert_dropout": 0.1},
    ),
    # ... with the balancing bias (DeepSeek-V3), instead of the gate loss or beside it
    "top2-dropless-bias": (
        "top-2 (128 wide), dropless, balancing bias 0.001, no gate loss",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0, "bias_balance": 0.001, "gate_weight": 0},
    ),
    "top2-dropless-bias-gate": (
        "top-2 (128 wide), dropless, balancing bias 0.001, gate loss 0.01",
        {"top_k": 2, "ffn": 128, "drop_tokens": 0, "bias_balance": 0.001},
    ),
}

#: target of issue 16 on the test split (mean over seeds), and the reach targets
TARGET_BLEU_GAIN, TARGET_UPDATES, TARGET_SECONDS = 1.0, 0.6, 0.7


def moe_settings(overrides=None):
    """The tiny recipe's MoE with the MoE criterion: as it stands (``overrides`` None),
    or BASELINE with ``overrides``."""
    base = {"dense_criterion": "model_and_base"}  # dense twins: this criterion, no gate loss
    if overrides is None:
        return recipes.settings("tiny", **base)
    return recipes.settings("tiny", **{**base, **BASELINE, **overrides})


def screen_runs(seeds):
    """``[(name, moe, settings, seed)]`` of the screen, every variant at every seed."""
    out = []
    for seed in seeds:
        for name, (_, over) in SCREEN.items():
            out.append((name, over is not None, moe_settings(over or {}), seed))
    return out


def final_pairs(seeds):
    """``[(dense run, MoE run)]`` of the final, a pair a seed: the recipe's MoE as it
    stands and its dense twin."""
    moe = moe_settings()
    return [(("dense", False, moe, s), ("moe", True, moe, s)) for s in seeds]


def recipe_name():
    """The screened variant whose settings the recipe has now, else ``recipe``."""
    recipe = moe_settings()
    same = (n for n, (_, o) in SCREEN.items() if o is not None and moe_settings(o) == recipe)
    return next(same, "recipe")


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
        "params": fairseq_log.model_params(text),
        "valid_curve": row["valid_curve"],
        "experts": s["experts"] if moe else None,
        "top_k": s["top_k"] if moe else None,
    }


def env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def score_test(a, run_dir):
    """``make demo``'s translation of the test split with the run's last checkpoint,
    scored with detokenized sacreBLEU (``mt_prep.bleu``): ``(bleu, sacreBLEU's line)``.
    generate's log: ``generate.log`` in the run's folder."""
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
    with open(gen, "w") as out, open(run_dir / "generate.log", "w") as log:
        proc = subprocess.run(cmd, stdout=out, stderr=log, env=env(), cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"translating the test split failed; see {run_dir / 'generate.log'}")
    with open(gen, encoding="utf-8") as f:
        hyps = bleu.detokenize(bleu.parse_generate_output(f))
    refs, _ = bleu.load_references(str(Path(a.databin).parent / "raw" / "test.de"))
    result, signature = bleu.score(hyps, refs, "de")
    return result.score, result.format(signature=signature)


def run_key(cmd):
    """What decides a run's result: its command but for the interpreter and the folder."""
    key = [str(x) for x in cmd[1:]]
    i = key.index("--save-dir")
    return key[:i] + key[i + 2 :]


def write_json(path, data):
    """``data`` to ``path``, whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def command(a, run, run_dir):
    """The training command of ``run`` (name, moe, settings, seed) in ``run_dir``."""
    _, moe, s, seed = run
    return compare.train_command(
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


def finished(run_dir, cmd):
    """The result in ``run_dir`` if it holds ``cmd``'s run, else None."""
    done = run_dir / "result.json"
    res = json.loads(done.read_text()) if done.exists() else None
    return res if res is not None and run_key(res["command"]) == run_key(cmd) else None


def final_jobs(a, pair, out):
    """``(run, run_dir, test, fresh)`` for a final pair: both trained afresh unless both
    are finished, so that the two always train side by side (their wall clocks are
    compared)."""
    dirs = [out / "final" / f"{r[0]}-s{r[3]}" for r in pair]
    fresh = not all(finished(d, command(a, r, d)) for r, d in zip(pair, dirs))
    return [(r, d, True, fresh) for r, d in zip(pair, dirs)]


def run_one(a, run, run_dir, test=False, fresh=False):
    """Train one run in ``run_dir`` (unless its ``result.json`` holds the same command
    and not ``fresh``) and, with ``test``, score it once on the test split; its numbers."""
    name, moe, s, seed = run
    cmd = command(a, run, run_dir)
    done = run_dir / "result.json"
    res = None if fresh else finished(run_dir, cmd)
    if res is None:
        # afresh: fairseq would resume from a checkpoint left here
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.iterdir():
            old.unlink()
        print(f"[study] {run_dir.name}: training", file=sys.stderr, flush=True)
        t0 = time.time()
        with open(run_dir / "train.log", "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"training failed; see {run_dir / 'train.log'}")
        res = {"name": name, "moe": moe, "seed": seed, "settings": s, "command": cmd}
        res.update(summarize_run((run_dir / "train.log").read_text(), s, moe))
        write_json(done, res)
        print(
            f"[study] {run_dir.name}: best valid BLEU {res['best_valid_bleu']} "
            f"({time.time() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    res["log"] = str(run_dir / "train.log")
    if test and "test_bleu" not in res:
        res["test_bleu"], res["test_signature"] = score_test(a, run_dir)
        write_json(done, res)
    return res


def reach(moe_log, dense_log):
    """When the MoE run first reached the dense run's best valid BLEU (parsed logs,
    ``mt_run.compare.summarize``): its updates and wall clock over the dense run's to that
    best; ``(None, None)`` if it never did."""
    d = compare.summarize(dense_log)
    m = compare.summarize(moe_log, comparable=d["best_valid_bleu"], within=0.0)
    if m["updates_to_comparable"] is None or not d["updates_to_best"]:
        return None, None
    dense_seconds = compare.wall_clock(dense_log, d["updates_to_best"])[0]
    seconds = m["seconds_to_comparable"]
    return (
        m["updates_to_comparable"] / d["updates_to_best"],
        seconds / dense_seconds if seconds and dense_seconds else None,
    )


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(v, f="{:.2f}"):
    return "–" if v is None else f.format(v)


def screen_table(results):
    """The screen's table, best first: each variant's best valid BLEU over its seeds and,
    the ranking, its gain over the dense run of the same seed (seeds differ by more than
    the variants do, so variants are compared seed by seed)."""
    by = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    dense = {r["seed"]: r["best_valid_bleu"] for r in by.get("dense", [])}

    def gain(name):
        return mean_sd(
            r["best_valid_bleu"] - dense[r["seed"]]
            for r in by[name]
            if r["seed"] in dense and r["best_valid_bleu"] is not None
        )

    lines = [
        "| variant | what | seeds | params | best valid BLEU | vs dense, same seed | "
        "last valid nll | dropped | s/update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(by, key=lambda n: -(gain(n)[0] or 0)):
        rows = by[name]
        best, sd = mean_sd(r["best_valid_bleu"] for r in rows)
        g, gsd = gain(name)
        nll, _ = mean_sd(r["last_valid_nll"] for r in rows)
        drop, _ = mean_sd(r["moe_drop"] for r in rows)
        spu, _ = mean_sd(r["seconds_per_update"] for r in rows)
        lines.append(
            f"| {name} | {SCREEN[name][0]} | {','.join(str(r['seed']) for r in rows)} | "
            f"{fmt(rows[0]['params'], '{:,}')} | {fmt(best)} ± {fmt(sd)} | "
            f"{fmt(g, '{:+.2f}')} ± {fmt(gsd)} | {fmt(nll, '{:.3f}')} | "
            f"{fmt(drop, '{:.1%}')} | {fmt(spu, '{:.3f}')} |"
        )
    return "\n".join(lines)


def final_table(pairs, load):
    """The final's table and verdict from ``[(dense result, MoE result)]`` (scored on
    test); ``load(result)``: its parsed log. Per seed and mean ± sd: test BLEU of dense
    and MoE, and when the MoE reached the dense run's best valid BLEU."""
    lines = [
        "| seed | dense test BLEU | MoE test BLEU | gain | dense best valid BLEU (update) | "
        "MoE best valid BLEU (update) | MoE updates to dense's best | MoE time to dense's best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cols = {k: [] for k in ("d", "m", "gain", "u", "t")}
    for d, m in pairs:
        u, t = reach(load(m), load(d))
        gain = m["test_bleu"] - d["test_bleu"]
        for k, v in zip(cols, (d["test_bleu"], m["test_bleu"], gain, u, t)):
            cols[k].append(v)
        lines.append(
            f"| {d['seed']} | {d['test_bleu']:.2f} | {m['test_bleu']:.2f} | {gain:+.2f} | "
            f"{fmt(d['best_valid_bleu'])} ({d['updates_to_best']}) | "
            f"{fmt(m['best_valid_bleu'])} ({m['updates_to_best']}) | {fmt(u, '{:.2f}×')} | "
            f"{fmt(t, '{:.2f}×')} |"
        )
    stats = {k: mean_sd(v) for k, v in cols.items()}
    unreached = sum(v is None for v in cols["u"])

    def ratio(k):
        if unreached:
            return f"{len(pairs) - unreached} of {len(pairs)} reached"
        return f"{fmt(stats[k][0], '{:.2f}×')} ± {fmt(stats[k][1])}"

    lines.append(
        "| mean ± sd | "
        + " | ".join(
            f"{fmt(stats[k][0], '{:+.2f}' if k == 'gain' else '{:.2f}')} ± {fmt(stats[k][1])}"
            for k in ("d", "m", "gain")
        )
        + f" | | | {ratio('u')} | {ratio('t')} |"
    )
    verdict = {
        "seeds": [d["seed"] for d, _ in pairs],
        "gain_mean": stats["gain"][0],
        "gain_sd": stats["gain"][1],
        "updates_ratio_mean": None if unreached else stats["u"][0],
        "seconds_ratio_mean": None if unreached else stats["t"][0],
        "unreached_seeds": unreached,
        "signature": pairs[0][0]["test_signature"] if pairs else None,
    }
    return "\n".join(lines), verdict


def load_log(result):
    return fairseq_log.parse(Path(result["log"]).read_text())


def write(a, screen, pairs):
    """``study.md`` and ``study.json`` from the finished runs; the markdown."""
    parts = [f"# MoE vs dense on the demo corpus ({time.strftime('%Y-%m-%d')})", ""]
    if screen:
        parts += ["## Screen (valid split)", "", screen_table(screen), ""]
    verdict = None
    if pairs:
        table, verdict = final_table(pairs, load_log)
        verdict["recipe"] = recipe_name()
        g, sd = verdict["gain_mean"], verdict["gain_sd"]
        u, t = verdict["updates_ratio_mean"], verdict["seconds_ratio_mean"]
        unreached = verdict["unreached_seeds"]
        parts += [
            f"## Final: the recipe's MoE ({verdict['recipe']}) against its dense twin, "
            f"{len(pairs)} seeds (test split)",
            "",
            table,
            "",
            f"Test BLEU gain {fmt(g, '{:+.2f}')} ± {fmt(sd)} (target ≥ +{TARGET_BLEU_GAIN}); "
            f"updates to dense's best {fmt(u, '{:.2f}×')} (target ≤ {TARGET_UPDATES}×), "
            f"wall clock {fmt(t, '{:.2f}×')} (target ≤ {TARGET_SECONDS}×)"
            + (f"; {unreached} MoE run(s) never reached dense's best" if unreached else "")
            + ".",
            "",
            f"sacreBLEU signature: {(verdict['signature'] or '').split(' = ')[0]}",
            "",
        ]
    parts.append(
        f"{a.updates} updates a run, BLEU every {VALID_INTERVAL} updates on "
        f"{VALID_STEPS * 64} valid sentences (beam 4); one thread a run, {a.jobs} at a time; "
        f"{os.cpu_count()} cores."
    )
    text = "\n".join(parts) + "\n"
    out = Path(a.out)
    (out / "study.md").write_text(text)
    runs = screen + [r for pair in pairs for r in pair]
    write_json(out / "study.json", {"runs": runs, "verdict": verdict})
    return text


def seeds(text):
    return [int(s) for s in text.split(",") if s]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("screen", "final", "all"), default="all")
    p.add_argument("--databin", default=str(REPO / "workspace" / "demo_en_de" / "databin"))
    p.add_argument("--out", default=str(REPO / "workspace" / "study"))
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--screen-seeds", type=seeds, default=[1, 2])
    p.add_argument("--final-seeds", type=seeds, default=[1, 2, 3])
    p.add_argument("--updates", type=int, default=UPDATES, help="updates a run")
    p.add_argument(
        "--only", default=None, help="comma-separated screen variants (default: all of SCREEN)"
    )
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if not (Path(a.databin) / "dict.en.txt").exists():
        sys.exit(
            f"study: no demo corpus in {a.databin} (--databin): prepare it with "
            "`python scripts/prepare_demo.py`, or run `make study`"
        )
    out = Path(a.out)
    failed = []

    def guarded(job):
        run, run_dir = job[:2]
        try:
            return run_one(a, *job)
        except Exception as e:  # the other runs go on; named at the end
            failed.append(f"{run_dir.name}: {e}")
            return None

    screen = []
    if a.stage in ("screen", "all"):
        runs = screen_runs(a.screen_seeds)
        if a.only:
            runs = [r for r in runs if r[0] in set(a.only.split(","))]
        jobs = [(r, out / "runs" / f"{r[0]}-s{r[3]}", False) for r in runs]
        with ThreadPoolExecutor(a.jobs) as pool:
            screen = [r for r in pool.map(guarded, jobs) if r]

    def side_by_side(pair):
        with ThreadPoolExecutor(min(2, a.jobs)) as both:
            return list(both.map(guarded, final_jobs(a, pair, out)))

    pairs = []
    if a.stage in ("final", "all"):
        with ThreadPoolExecutor(max(1, a.jobs // 2)) as pool:
            pairs = [p for p in pool.map(side_by_side, final_pairs(a.final_seeds)) if all(p)]
    print(write(a, screen, pairs))
    if failed:
        sys.exit("study: failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
