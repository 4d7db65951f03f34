#!/usr/bin/env python
# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""MoE x8 top-1 against the dense Transformer, on the same machine and data, in one run.

``make bench-perf`` (or ``python scripts/bench_perf.py``) measures, on the bundled demo
corpus (``workspace/demo_en_de/databin``, prepared by ``scripts/prepare_demo.py``):

* ``layer``: one MoE layer (DeepSpeed's path and the plugin's local path) against a
  dense FFN of the same width, forward+backward (training: capacity factor 1, token
  dropping) and forward alone (inference: no dropping), at several token counts;
  and the peak memory growth of forward+backward with the token count (must be linear);
* ``train``: train tokens/s in one process: fairseq's ``Trainer`` on the dense model,
  the MoE model through DeepSpeed's path and the MoE model through the local path,
  the same batches, one update of each in turn;
* ``generate``: beam search tokens/s (incremental decoding) in one process, the three
  models in turn on each batch (``task.inference_step``, as ``fairseq-generate``
  does; every hypothesis forced to the same length so each model does the same
  work), then ``user/generate.py`` itself on the same sentences;
* ``dist``: 2 processes (torchrun, gloo): expert-parallel MoE (EP=2) against
  data-parallel dense (``legacy_ddp`` for both), an update of each in turn in the same
  processes, then ``user/train.py`` under torchrun for each;
* ``scale`` (``make bench-scale``, not run by default): the ``dist`` worker at W = 1, 2,
  4, 8 processes (``--worlds``), MoE with ``--ep-world-size W`` against dense data
  parallel: training at every W, validation and beam search (lockstep) at W = 2, 4
  (``--scale-inference-worlds``); ``scale.md`` and ``scale.png`` besides ``results.json``.

MoE and dense are timed interleaved in the same processes (the machine may be
shared: a load change then hits both); each ratio is the median of per-batch
ratios. Results: a table on stdout and ``$OUT/results.json`` (hardware, versions,
settings, load averages, raw timings). Each part runs in its own process.
"""

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from mt_run import fairseq_log, processes, recipes

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "user"
PARTS = ("layer", "train", "generate", "dist", "scale")
DEFAULT_PARTS = PARTS[:4]  # scale: make bench-scale
TARGETS = {"train": 0.95, "generate": 0.9, "dist": 0.8}
SCALE_TARGETS = {"train": 0.9, "valid": 0.85}
# the MoE variants the dist worker trains (the last two: with --dist-dropless)
DIST_VARIANTS = ("moe", "moe_dropless", "moe_dropless_buffers")
# the benchmarked model: make demo's (the tiny recipe), twice as wide (d=128, FFN/expert
# 512: --dim, --ffn), with 8 experts top-1 (--experts, --top-k), dropout 0.1 and lr 0.002;
# dense: the same criterion (model_and_base) without gate loss
MODEL = {
    "dim": 128,
    "ffn": 512,
    "experts": 8,
    # top-1 with capacity factor 1 and dropping in training, whatever the tiny recipe's
    # routing is: the speed measured here is that layer's (docs/performance.md)
    "top_k": 1,
    "drop_tokens": 1,
    "bias_balance": None,
    "dropout": 0.1,
    "lr": 0.002,
    "dense_criterion": "model_and_base",
}


# ----------------------------------------------------------------------------- helpers


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ratios(times: dict, names, base: str = "dense") -> dict:
    """``{<name>_ratio: MoE/dense}`` for each variant in ``names``: the median of the
    per-batch ratios of dense's (``base``'s) time to the variant's (measured in turn on
    the same batches, ``times[name]`` in batch order)."""
    return {f"{n}_ratio": median([d / m for d, m in zip(times[base], times[n])]) for n in names}


def in_turn(names, i: int) -> list:
    """The order in which the variants ``names`` run on the ``i``-th batch: rotated by
    one each batch, so none always runs first (or right after the same one)."""
    k = i % len(names)
    return [*names[k:], *names[:k]]


def quiet():
    """Keep fairseq's and DeepSpeed's logging and warnings out of the measurements' output."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def import_plugin():
    """The plugin, imported as ``--user-dir`` imports it (fairseq puts the repository first
    on ``sys.path``, so ``user`` is this checkout's)."""
    from argparse import Namespace

    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=str(USER_DIR)))


def model_args(a, moe: bool, max_tokens: int, ep: int = 1):
    """fairseq-train flags of the benchmarked model (``MODEL``; dense: its dense twin,
    ``recipes.train_flags``, top-1: the same FFN width)."""
    s = recipes.settings(
        "tiny",
        **{
            **MODEL,
            "dim": a.dim,
            "ffn": a.ffn,
            "layers": a.layers,
            "heads": a.heads,
            "experts": a.experts,
            "top_k": a.top_k,
            "ep_world_size": ep,
        },
    )
    # fmt: off
    return [*recipes.train_flags(s, moe=moe), "-s", "en", "-t", "de",
            "--max-tokens", str(max_tokens), "--seed", "1", "--cpu", "--num-workers", "0"]
    # fmt: on


def build_trainer(databin, argv):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(databin), *argv, "--user-dir", str(USER_DIR)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, Trainer(cfg, task, model, criterion)


def first_batches(trainer, n: int):
    """The first ``n`` training batches of epoch 1 (every variant gets the same ones)."""
    trainer.task.load_dataset("train")
    itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
    return [next(itr) for _ in range(n)]


def moe_layers(model):
    """The model's MoE layers (``user.modules.moe_ffn.MoEFeedForward``)."""
    return [m for m in model.modules() if hasattr(m, "uses_local_dispatch")]


def set_fast(model, on: Optional[bool]):
    """``fast_dispatch`` of every MoE layer: local dispatch and the exchange (None: the
    default, ``FAIRSEQ_MOE_FAST_DISPATCH``), or DeepSpeed's buffers (False)."""
    for m in moe_layers(model):
        m.fast_dispatch = on


def exact_fit_from(model, tokens: Optional[int]):
    """``exact_fit_min_tokens`` of every MoE layer (None: the layer's default)."""
    for m in moe_layers(model):
        m.exact_fit_min_tokens = type(m).exact_fit_min_tokens if tokens is None else tokens


def paths(model):
    """The paths the MoE layers took in their last forward (``MoEFeedForward.path``)."""
    return {m.path for m in moe_layers(model)}


@contextlib.contextmanager
def no_stderr():
    """Silence the C++ profiler's start/stop lines (written to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_logged(cmd, log, env=None, timeout=600):
    """Run a command, output to ``log``; returns its output text. A timeout kills its
    whole process tree (torchrun's workers included)."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = processes.run(
            [str(c) for c in cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            timeout=timeout,
        )
    text = Path(log).read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}), "
            f"see {log}:\n{text[-3000:]}"
        )
    return text, time.time() - t0


def cli_env(**extra):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- layer


def part_layer(a):
    import torch

    from user.modules.moe_ffn import ExpertFFN, MoEFeedForward
    from user.moe_options import MoEOptions

    torch.manual_seed(1)
    opts = MoEOptions(
        sides=frozenset({"enc"}), num_experts=a.experts, top_k=a.top_k, min_capacity=4
    )
    moe = MoEFeedForward(a.dim, ExpertFFN(a.dim, a.ffn), opts, "encoder.0", seed=1)
    dense = ExpertFFN(a.dim, a.ffn)
    variants = {"dense": dense, "moe_ds": moe, "moe": moe}

    def call(name, x):
        if name == "dense":
            return dense(x), None
        moe.fast_dispatch = name == "moe"
        y = moe(x)
        return y, moe.l_aux

    def fwd_bwd(name, x):
        mod = variants[name]
        mod.train()
        mod.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)
        t = time.perf_counter()
        y, aux = call(name, x)
        loss = y.float().pow(2).mean() + (aux if aux is not None else 0.0)
        loss.backward()
        return time.perf_counter() - t

    @torch.no_grad()
    def fwd_eval(name, x):
        variants[name].eval()
        t = time.perf_counter()
        call(name, x)
        return time.perf_counter() - t

    def peak_bytes(name, x):
        """Peak growth of the CPU allocator's allocated bytes during forward+backward."""
        from torch.profiler import ProfilerActivity, profile

        with tempfile.TemporaryDirectory() as tmp:
            with (
                no_stderr(),
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
            ):
                fwd_bwd(name, x)
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            events = json.load(open(trace))["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        return max(totals) if totals else float("nan")

    names = ("dense", "moe_ds", "moe")
    rows = []
    for n in a.layer_tokens:
        x = torch.randn(n // 8, 8, a.dim)
        for name in names:  # warm up
            fwd_bwd(name, x)
            fwd_eval(name, x)
        times = {("train", k): [] for k in names}
        times.update({("eval", k): [] for k in names})
        for rep in range(a.layer_reps):
            order = in_turn(names, rep)
            for name in order:
                times[("train", name)].append(fwd_bwd(name, x))
            for name in order:
                times[("eval", name)].append(fwd_eval(name, x))
        mem = {name: peak_bytes(name, x) for name in names}
        row = {"tokens": n, "load": loadavg()}
        for mode in ("train", "eval"):
            for name in names:
                row[f"{mode}_{name}_ms"] = 1000 * median(times[(mode, name)])
            for name in ("moe_ds", "moe"):
                per_batch = [d / m for d, m in zip(times[(mode, "dense")], times[(mode, name)])]
                row[f"{mode}_{name}_ratio"] = median(per_batch)
        for name in names:
            row[f"peak_{name}_bytes"] = mem[name]
        rows.append(row)
        print(
            f"  layer {n:>6} tokens: train ratio ds {row['train_moe_ds_ratio']:.2f} "
            f"local {row['train_moe_ratio']:.2f}; eval ratio ds {row['eval_moe_ds_ratio']:.2f} "
            f"local {row['eval_moe_ratio']:.2f}; peak MB dense {mem['dense'] / 2**20:.1f} "
            f"ds {mem['moe_ds'] / 2**20:.1f} local {mem['moe'] / 2**20:.1f}  (load {row['load']})",
            flush=True,
        )
    linear = {}
    ns = [float(r["tokens"]) for r in rows]
    for name in names:
        peaks = [float(r[f"peak_{name}_bytes"]) for r in rows]
        linear[name] = memory_fit(ns, peaks)
    return {"rows": rows, "memory_linearity": linear}


def memory_fit(ns, peaks):
    """Least-squares fits of peak bytes against tokens: ``a + b n`` (``b``: bytes per
    token) and ``a + b n + c n^2``. Growth is linear when a positive quadratic term
    accounts for at most 10% of the peak at the largest count (a dense one-hot dispatch, which
    grows with tokens x experts x capacity, gives about 100%)."""
    import numpy as np

    n, p = np.array(ns), np.array(peaks)
    if len(n) < 3:
        return {
            "bytes_per_token": float(p[-1] / n[-1]),
            "quadratic_share": float("nan"),
            "linear": None,
        }
    b, a = np.polyfit(n, p, 1)
    c = np.polyfit(n, p, 2)[0]
    share = c * n[-1] ** 2 / p[-1]  # > 0: growing faster than linearly
    return {
        "bytes_per_token": float(b),
        "quadratic_share": float(share),
        "linear": bool(share <= 0.1),
    }


# ----------------------------------------------------------------------------- train


def part_train(a):
    databin = a.databin
    variants = {}
    cfg = None
    for name, moe, fast in (("dense", False, None), ("moe_ds", True, False), ("moe", True, True)):
        cfg, trainer = build_trainer(databin, model_args(a, moe, a.max_tokens))
        if fast is not None:
            set_fast(trainer.model, fast)
        variants[name] = trainer
    batches = first_batches(variants["dense"], a.warmup + a.updates)
    names = list(variants)
    times = {k: [] for k in names}
    tokens = []
    for i, batch in enumerate(batches):
        order = in_turn(names, i)
        for name in order:
            sample = copy.deepcopy(batch)
            t = time.perf_counter()
            variants[name].train_step([sample])
            dt = time.perf_counter() - t
            if i >= a.warmup:
                times[name].append(dt)
        if i >= a.warmup:
            tokens.append(batch["ntokens"])
    out = {
        "load_end": loadavg(),
        "updates": a.updates,
        "warmup_updates": a.warmup,
        "tokens": sum(tokens),
        "params": {},
    }
    for name in names:
        tr = variants[name]
        out["params"][name] = sum(p.numel() for p in tr.model.parameters())
        wps = [n / t for n, t in zip(tokens, times[name])]
        out[f"{name}_wps_median"] = median(wps)
        out[f"{name}_wps_total"] = sum(tokens) / sum(times[name])
        out[f"{name}_step_s"] = times[name]
    out.update(ratios(times, ("moe_ds", "moe")))
    if a.profile:
        out["profile"] = profile_steps(variants, batches[: min(6, len(batches))])
    # checkpoints for the generation part
    ck = Path(a.out)
    ck.mkdir(parents=True, exist_ok=True)
    for name in ("dense", "moe"):
        variants[name].consolidate_optimizer()
        variants[name].save_checkpoint(str(ck / f"checkpoint_{name}.pt"), {})
    return out


def profile_steps(variants, batches, rows=25):
    """torch.profiler tables (self CPU time) of a few updates per model."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, tr in variants.items():
        with no_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                tr.train_step([copy.deepcopy(b)])
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"== profile: {name}\n{tables[name]}", flush=True)
    return tables


# ----------------------------------------------------------------------------- generate


def subset_databin(src: Path, dst: Path, n: int) -> Path:
    """A databin whose test split is the first ``n`` test sentences of ``src``."""
    from fairseq.data import indexed_dataset

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("dict.") or f.name == "spm.model":
            shutil.copyfile(f, dst / f.name)
    for lang in ("en", "de"):
        prefix = src / f"test.en-de.{lang}"
        ds = indexed_dataset.make_dataset(str(prefix), impl="mmap")
        out = dst / f"test.en-de.{lang}"
        builder = indexed_dataset.make_builder(
            str(out) + ".bin",
            impl="mmap",
            vocab_size=sum(1 for _ in open(src / f"dict.{lang}.txt")) + 4,
        )
        for i in range(min(n, len(ds))):
            builder.add_item(ds[i])
        builder.finalize(str(out) + ".idx")
    return dst


def gen_flags(a):
    # fmt: off
    return ["--beam", str(a.beam), "--max-len-a", "0", "--max-len-b", str(a.gen_len),
            "--min-len", str(a.gen_len), "--batch-size", str(a.gen_batch_size), "--gen-subset", "test",
            "--cpu", "--num-workers", "0", "-s", "en", "-t", "de"]
    # fmt: on


def ensure_checkpoints(a):
    out = Path(a.out)
    if all((out / f"checkpoint_{n}.pt").exists() for n in ("dense", "moe")):
        return
    # no train part in this run: untrained models (the work per token is the same)
    out.mkdir(parents=True, exist_ok=True)
    for name, moe in (("dense", False), ("moe", True)):
        _, trainer = build_trainer(a.databin, model_args(a, moe, a.max_tokens))
        trainer.consolidate_optimizer()
        trainer.save_checkpoint(str(out / f"checkpoint_{name}.pt"), {})


def part_generate(a):
    import torch
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    ensure_checkpoints(a)
    out = Path(a.out)
    sub = subset_databin(Path(a.databin), out / "databin_test", a.gen_sentences)
    models, task = {}, None
    for name, ck in (("dense", "dense"), ("moe_ds", "moe"), ("moe", "moe")):
        parser = options.get_generation_parser()
        # fmt: off
        args = options.parse_args_and_arch(
            parser, [str(sub), "--path", str(out / f"checkpoint_{ck}.pt"), "--user-dir", str(USER_DIR),
                     *gen_flags(a)])
        # fmt: on
        cfg = convert_namespace_to_omegaconf(args)
        ms, _, tk = checkpoint_utils.load_model_ensemble_and_task(
            [cfg.common_eval.path], arg_overrides={"data": str(sub)}
        )
        m = ms[0].eval()
        if name != "dense":
            set_fast(m, name == "moe")
        tk.load_dataset("test")
        models[name] = (m, tk, tk.build_generator([m], cfg.generation))
        task = tk
    itr = task.get_batch_iterator(
        task.dataset("test"), max_sentences=a.gen_batch_size, seed=1
    ).next_epoch_itr(shuffle=False)
    batches = list(itr)
    names = list(models)
    times = {k: [] for k in names}
    ntok = {k: [] for k in names}
    hyps = {k: {} for k in names}
    # warm-up, not timed; meanwhile, how concentrated decoding's routes are (busiest
    # expert's tokens over an even share, per MoE layer call): DeepSpeed's no-drop buffers
    # are sized by the busiest expert
    imbalance = []

    def record(mod, args, out):
        c = mod.exp_counts.float()
        imbalance.append(float(c.max() * c.numel() / c.sum().clamp_min(1)))

    hooks = [
        mod.register_forward_hook(record)
        for mod in models["moe"][0].modules()
        if hasattr(mod, "uses_local_dispatch")
    ]
    with torch.no_grad():
        for name in names:
            m, tk, gen = models[name]
            tk.inference_step(gen, [m], batches[0])
    for h in hooks:
        h.remove()
    for rep in range(a.gen_reps):
        for i, batch in enumerate(batches):
            j = rep * len(batches) + i
            order = in_turn(names, j)
            for name in order:
                m, tk, gen = models[name]
                t = time.perf_counter()
                with torch.no_grad():
                    hypos = tk.inference_step(gen, [m], batch)
                times[name].append(time.perf_counter() - t)
                ntok[name].append(sum(len(h[0]["tokens"]) for h in hypos))
                for sid, h in zip(batch["id"].tolist(), hypos):
                    hyps[name][sid] = h[0]["tokens"].tolist()
    res = {
        "load_end": loadavg(),
        "sentences": len(hyps["dense"]),
        "batches": len(batches),
        "reps": a.gen_reps,
        "routing_imbalance_median": median(imbalance),
    }
    for name in names:
        res[f"{name}_tps_median"] = median([n / t for n, t in zip(ntok[name], times[name])])
        res[f"{name}_tps_total"] = sum(ntok[name]) / sum(times[name])
        res[f"{name}_batch_s"] = times[name]
    res.update(ratios(times, ("moe_ds", "moe")))
    same = sum(hyps["moe"][s] == hyps["moe_ds"][s] for s in hyps["moe"])
    res["local_vs_deepspeed_identical_hypotheses"] = f"{same}/{len(hyps['moe'])}"

    # the CLI itself, parsing fairseq's "Translated" line: separate processes one after
    # the other (noisier than the interleaved batches above), dense and MoE alternating
    cli = {"dense": [], "moe": []}
    for rep in range(a.cli_reps if a.cli else 0):
        for name in ("dense", "moe"):
            text, _ = run_logged(
                [
                    sys.executable,
                    USER_DIR / "generate.py",
                    sub,
                    "--path",
                    out / f"checkpoint_{name}.pt",
                    *gen_flags(a),
                ],
                out / f"generate_{name}_{rep}.log",
                env=cli_env(),
            )
            done = fairseq_log.translated(text)
            sent, tok, secs = done["sentences"], done["tokens"], done["seconds"]
            cli[name].append(
                {
                    "sentences": sent,
                    "tokens": tok,
                    "seconds": secs,
                    "tps": tok / secs,
                    "load": loadavg(),
                }
            )
            print(
                f"  user/generate.py {name}: {tok / secs:.0f} tokens/s ({sent} sentences, "
                f"load {loadavg()})",
                flush=True,
            )
    if cli["dense"]:
        cli["dense_tps_median"] = median([r["tps"] for r in cli["dense"]])
        cli["moe_tps_median"] = median([r["tps"] for r in cli["moe"]])
        cli["moe_ratio"] = median([m["tps"] / d["tps"] for d, m in zip(cli["dense"], cli["moe"])])
    else:
        cli = {}
    res["cli"] = cli
    return res


# ----------------------------------------------------------------------------- dist


def part_dist_worker(a):
    """One of W torchrun processes (W = ``WORLD_SIZE``): dense data parallel and MoE with
    ``--ep-world-size W`` (MoE at W = 1: one process, every expert local), an update each
    in turn; with ``--dist-dropless`` also MoE trained with ``--no-moe-drop-tokens``, on
    the exchange (the default) and on DeepSpeed's buffers at the capacity the ranks agree
    on (``FAIRSEQ_MOE_FAST_DISPATCH=0``); then, as ``--dist-valid`` and
    ``--dist-generate`` say, validation and beam search, the models in turn. Rank 0
    writes the results to ``--json``."""
    import torch
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # fmt: off
    dflags = ["--distributed-init-method", "env://", "--distributed-no-spawn",
              "--distributed-world-size", str(world), "--distributed-rank", str(rank),
              "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    # fmt: on
    builds = [("dense", False, []), ("moe", True, [])]
    if a.dist_dropless:
        builds.append(("moe_dropless", True, ["--no-moe-drop-tokens"]))
    trainers = {}
    for name, moe, extra in builds:
        cfg_argv = model_args(a, moe, a.dist_max_tokens, ep=world) + extra + dflags
        if not dist.is_initialized():
            from fairseq import options
            from fairseq.dataclass.utils import convert_namespace_to_omegaconf

            parser = options.get_training_parser()
            args = options.parse_args_and_arch(
                parser, [str(a.databin), *cfg_argv, "--user-dir", str(USER_DIR)]
            )
            distributed_utils.distributed_init(convert_namespace_to_omegaconf(args))
        _, trainers[name] = build_trainer(a.databin, cfg_argv)
    logging.disable(logging.WARNING)
    batches = first_batches(trainers["dense"], a.warmup + a.dist_updates)
    # what is timed: a trainer and its layers' fast_dispatch (set_fast)
    variants = {name: (trainer, None) for name, trainer in trainers.items()}
    if a.dist_dropless:
        variants["moe_dropless_buffers"] = (trainers["moe_dropless"], False)
    names = list(variants)

    def use(name):
        """Variant ``name``'s trainer, its layers set for it."""
        trainer, fast = variants[name]
        set_fast(trainer.model, fast)
        # the buffers at the capacity the ranks agree on, whatever the batch's size
        exact_fit_from(trainer.model, 0 if name == "moe_dropless_buffers" else None)
        return trainer

    times = {k: [] for k in names}
    taken = {k: set() for k in names}  # the layers' paths (a test checks them)
    tokens = []
    for i, batch in enumerate(batches):
        for name in in_turn(names, i):
            trainer = use(name)
            sample = copy.deepcopy(batch)
            dist.barrier()
            t = time.perf_counter()
            trainer.train_step([sample])
            dt = time.perf_counter() - t
            taken[name] |= paths(trainer.model)
            if i >= a.warmup:
                times[name].append(dt)
        n = torch.tensor([float(batch["ntokens"])])
        dist.all_reduce(n)
        if i >= a.warmup:
            tokens.append(float(n))
    for trainer in trainers.values():
        # a rank with no batch left validates this one and discards it (as fairseq's
        # validate with the first batch it saw)
        trainer._dummy_batch = batches[0]
    for trainer in trainers.values():
        set_fast(trainer.model, None)
        exact_fit_from(trainer.model, None)
    dense_and_moe = {k: trainers[k] for k in ("dense", "moe")}
    valid = valid_times(dense_and_moe, reps=a.valid_reps) if a.dist_valid else None
    gen = gen_times(dense_and_moe, a) if a.dist_generate else None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in names:
            trainer = use(name)
            with no_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for batch in batches[: min(4, len(batches))]:
                    trainer.train_step([copy.deepcopy(batch)])
            if rank == 0:
                print(
                    f"== profile rank 0: {name}\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
                    flush=True,
                )
    if rank == 0:
        res = {
            "load_end": loadavg(),
            "updates": a.dist_updates,
            "processes": world,
            "ep_world_size": world,
            "global_tokens": sum(tokens),
        }
        for name in names:
            res[f"{name}_wps_median"] = median([n / t for n, t in zip(tokens, times[name])])
            res[f"{name}_wps_total"] = sum(tokens) / sum(times[name])
            res[f"{name}_step_s"] = times[name]
            if name != "dense":
                res[f"{name}_paths"] = sorted(taken[name])
        res.update(ratios(times, names[1:]))
        if a.dist_dropless:
            # > 1: the exchange trains dropless faster than the agreed capacity
            res["moe_dropless_vs_buffers"] = ratios(
                times, ("moe_dropless",), base="moe_dropless_buffers"
            )["moe_dropless_ratio"]
        res["valid"] = valid
        res["generate"] = gen
        Path(a.json).write_text(json.dumps(res))
    dist.barrier()


def valid_times(trainers, reps):
    """Validation (``trainer.valid_step``, no token dropped) on the valid split, each
    rank its shard, ``reps`` times after one warm-up batch: dense, MoE (the default:
    the exchange, each expert sent exactly its routes) and MoE on DeepSpeed's buffer
    path fit to the busiest expert (``FAIRSEQ_MOE_FAST_DISPATCH=0``); a batch of each
    in turn."""
    import torch
    import torch.distributed as dist

    variants = {
        "dense": (trainers["dense"], None),
        "moe": (trainers["moe"], None),
        "moe_buffers": (trainers["moe"], False),
    }
    trainers["dense"].task.load_dataset("valid")
    itr = trainers["dense"].get_valid_iterator("valid").next_epoch_itr(shuffle=False)
    batches = list(itr)
    batches = batches[:1] + batches * reps
    warmup = 1
    times = {k: [] for k in variants}
    tokens = []
    names = list(variants)
    for i, batch in enumerate(batches):
        for name in in_turn(names, i):
            trainer, fast = variants[name]
            if name != "dense":
                set_fast(trainer.get_model(), fast)
            sample = copy.deepcopy(batch)
            dist.barrier()
            t = time.perf_counter()
            trainer.valid_step(sample)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        n = torch.tensor([float(batch.get("ntokens", 0) or 0)])
        dist.all_reduce(n)
        if i >= warmup:
            tokens.append(float(n))
    set_fast(trainers["moe"].get_model(), None)
    return {
        "batches": len(tokens),
        "global_tokens": sum(tokens),
        **{f"{k}_wps_total": sum(tokens) / sum(v) for k, v in times.items()},
        **ratios(times, ("moe", "moe_buffers")),
    }


def gen_times(trainers, a):
    """Beam search (``task.inference_step``, as ``fairseq-generate``) on the test split,
    each rank its own share of the sentences (fairseq's sharding), ``--gen-batches``
    batches of ``--gen-batch-size`` sentences per rank (weak scaling), ``--gen-reps``
    passes, every hypothesis ``--gen-len`` tokens: the dense model
    (data parallel: every rank decodes alone), the MoE model (expert parallel: the
    ranks decode in lockstep, :mod:`user.lockstep`) and the MoE model on DeepSpeed's
    buffer path (``FAIRSEQ_MOE_FAST_DISPATCH=0``) in turn on every batch. Each batch
    is timed from a barrier to a barrier, so both models are charged their slowest rank.
    Global tokens/s: the hypotheses' tokens of all ranks over rank 0's time."""
    import torch
    import torch.distributed as dist
    from fairseq.dataclass.configs import GenerationConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GenerationConfig(beam=a.beam, max_len_a=0, max_len_b=a.gen_len, min_len=a.gen_len)
    task = trainers["dense"].task
    task.load_dataset("test")
    itr = task.get_batch_iterator(
        task.dataset("test"), max_sentences=a.gen_batch_size, num_shards=world, shard_id=rank
    ).next_epoch_itr(shuffle=False)
    # every rank the same number of batches (no rank waits in lockstep for another's last)
    batches = [b for _, b in zip(range(a.gen_batches), itr)]
    n = torch.tensor([len(batches)])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    batches = batches[: int(n)]
    models = {}
    for name, trainer in trainers.items():
        model = trainer.get_model().eval()
        models[name] = (model, trainer.task, trainer.task.build_generator([model], cfg))
    models["moe_buffers"] = models["moe"]
    names = list(models)
    times = {k: [] for k in names}
    tokens = []
    with torch.no_grad():
        for i, batch in enumerate(batches[:1] + batches * a.gen_reps):  # the first: warm-up
            ntok = 0
            for name in in_turn(names, i):
                model, task, gen = models[name]
                set_fast(model, False if name == "moe_buffers" else None)
                dist.barrier()
                t = time.perf_counter()
                hypos = task.inference_step(gen, [model], batch)
                dist.barrier()
                if i > 0:
                    times[name].append(time.perf_counter() - t)
                ntok = sum(len(h[0]["tokens"]) for h in hypos)
            c = torch.tensor([float(ntok)])
            dist.all_reduce(c)
            if i > 0:
                tokens.append(float(c))
    for trainer in trainers.values():
        trainer.get_model().train()
    return {
        "batches_per_rank": len(batches),
        "reps": a.gen_reps,
        "sentences": len(batches) * world * a.gen_batch_size,
        "global_tokens": sum(tokens),
        **{f"{k}_tps_total": sum(tokens) / sum(v) for k, v in times.items()},
        **{f"{k}_tps_median": median([n / t for n, t in zip(tokens, v)]) for k, v in times.items()},
        **ratios(times, ("moe", "moe_buffers")),
    }


def run_dist_worker(a, world: int, name: str, valid: bool, generate: bool) -> dict:
    """:func:`part_dist_worker` in ``world`` torchrun processes (output in
    ``$OUT/<name>.log``); rank 0's results. A timeout kills the whole process tree."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    tmp = out / f"{name}.json"
    if tmp.exists():
        tmp.unlink()
    flags = [*passthrough(a), "--dist-valid" if valid else "--no-dist-valid"]
    flags.append("--dist-generate" if generate else "--no-dist-generate")
    # fmt: off
    run_logged([torchrun, "--nproc_per_node", world, "--master_port", processes.free_port(), __file__,
                "--worker", "dist", "--json", tmp, *flags],
               out / f"{name}.log", env=cli_env(), timeout=a.timeout)
    # fmt: on
    return json.loads(tmp.read_text())


def part_dist(a):
    out = Path(a.out)
    torchrun = Path(sys.executable).parent / "torchrun"
    res = run_dist_worker(a, 2, "dist_worker", valid=True, generate=False)
    cli = {}
    if a.cli:
        for name, moe in (("dense", False), ("moe", True)):
            # fmt: off
            text, wall = run_logged(
                [torchrun, "--nproc_per_node", "2", "--master_port", processes.free_port(),
                 USER_DIR / "train.py", a.databin, *model_args(a, moe, a.dist_max_tokens, ep=2),
                 "--ddp-backend", "legacy_ddp", "--max-update", str(a.warmup + a.cli_updates),
                 "--no-save", "--disable-validation", "--log-interval", "1", "--log-format", "simple"],
                out / f"dist_cli_{name}.log", env=cli_env(), timeout=a.timeout)
            # fmt: on
            wps = fairseq_log.wps(text, skip=a.warmup)
            cli[name] = {
                "wps_median": median(wps),
                "updates": len(wps),
                "wall_s": wall,
                "load": loadavg(),
            }
            print(
                f"  torchrun user/train.py {name}: median {median(wps):.0f} wps over {len(wps)} "
                f"updates (load {loadavg()})",
                flush=True,
            )
        cli["moe_ratio"] = cli["moe"]["wps_median"] / cli["dense"]["wps_median"]
    res["cli"] = cli
    return res


# ----------------------------------------------------------------------------- scale


def part_scale(a):
    """:func:`part_dist_worker` at every W of ``--worlds``: training at each, validation
    and beam search at those of ``--scale-inference-worlds``."""
    res = {"worlds": {}}
    a = copy.copy(a)
    a.dist_updates = a.scale_updates
    for world in a.worlds:
        inference = world in a.scale_inference_worlds
        load0 = loadavg()
        t0 = time.time()
        r = run_dist_worker(a, world, f"scale_w{world}", valid=inference, generate=inference)
        r.update(load_start=load0, seconds=round(time.time() - t0, 1))
        res["worlds"][str(world)] = r
        print("  " + scale_progress(world, r), flush=True)
    return res


def scale_progress(world: int, r: dict) -> str:
    line = f"W={world}: train MoE/dense {r['moe_ratio']:.2f}x"
    if "moe_dropless_ratio" in r:
        line += (
            f", dropless {r['moe_dropless_ratio']:.2f}x (buffer path "
            f"{r['moe_dropless_buffers_ratio']:.2f}x)"
        )
    for part in ("valid", "generate"):
        if r.get(part):
            p = r[part]
            line += f", {part} {p['moe_ratio']:.2f}x (buffer path {p['moe_buffers_ratio']:.2f}x)"
    return line + f" ({r['seconds']} s, load {r['load_start']} -> {r['load_end']})"


def scale_rows(res: dict) -> list:
    """One row per W: global tokens/s of dense and MoE and the MoE/dense ratio (the
    median of per-batch ratios) for training, dropless training (MoE only: dense is
    training's), validation and beam search (``None`` where not measured; for the last
    three also the ratio of MoE on DeepSpeed's buffer path), with the load average at the
    start and end of the run."""
    rows = []
    for w, r in sorted(res["worlds"].items(), key=lambda kv: int(kv[0])):
        row = {"W": int(w), "load": f"{r['load_start']} -> {r['load_end']}"}
        row.update(train_dense=r["dense_wps_median"], train_moe=r["moe_wps_median"])
        row["train_ratio"] = r["moe_ratio"]
        row["dropless_moe"] = r.get("moe_dropless_wps_median")
        row["dropless_ratio"] = r.get("moe_dropless_ratio")
        row["dropless_buffers_ratio"] = r.get("moe_dropless_buffers_ratio")
        for kind, key, part in (("valid", "wps_total", "valid"), ("beam", "tps_total", "generate")):
            p = r.get(part) or {}
            row[f"{kind}_dense"] = p.get(f"dense_{key}")
            row[f"{kind}_moe"] = p.get(f"moe_{key}")
            row[f"{kind}_ratio"] = p.get("moe_ratio")
            row[f"{kind}_buffers_ratio"] = p.get("moe_buffers_ratio")
        rows.append(row)
    return rows


def scale_markdown(rows: list, info: dict, a) -> str:
    """The table of :func:`scale_rows` in markdown, under a header naming the machine:
    its cores (W processes of one thread each: beyond the cores they share them), the load
    average and the targets."""

    def n(x):
        return "–" if x is None else f"{x:,.0f}"

    def q(x, buffers=None):
        return "–" if x is None else f"{x:.2f}" + ("" if buffers is None else f" ({buffers:.2f})")

    lines = [
        f"MoE x{a.experts} top-{a.top_k} (expert parallel, --ep-world-size W) vs dense data "
        f"parallel, W processes of OMP_NUM_THREADS={info['omp_threads']} on {info['cpu']}, "
        f"**{info['cores']} cores** (W > {info['cores']}: oversubscribed); load average "
        f"{info['load_start']} at the start, {info['load_end']} at the end; "
        f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}.",
        "",
        f"Global tokens/s. Train: --max-tokens {a.dist_max_tokens} per process. Dropless: "
        "MoE trained with --no-moe-drop-tokens (the exchange, at W = 1 the local path; in "
        "parentheses the buffer path at the capacity the ranks agree on). Validation: no "
        "token dropped. Beam: beam "
        f"{a.beam}, {a.gen_batches} batches of {a.gen_batch_size} sentences per process, "
        f"{a.gen_len} tokens per hypothesis. MoE/dense: the median of per-batch ratios, models measured in turn "
        "in the same processes; in parentheses MoE on DeepSpeed's buffer path "
        f"(FAIRSEQ_MOE_FAST_DISPATCH=0). Targets: train >= {SCALE_TARGETS['train']}, "
        f"validation >= {SCALE_TARGETS['valid']}.",
        "",
        "| W | train dense | train MoE | MoE/dense | dropless MoE | MoE/dense | valid dense "
        "| valid MoE | MoE/dense | beam dense | beam MoE | MoE/dense | load (1, 5, 15 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['W']} | {n(r['train_dense'])} | {n(r['train_moe'])} | "
            f"{q(r['train_ratio'])} | {n(r['dropless_moe'])} | "
            f"{q(r['dropless_ratio'], r['dropless_buffers_ratio'])} | "
            f"{n(r['valid_dense'])} | {n(r['valid_moe'])} | "
            f"{q(r['valid_ratio'], r['valid_buffers_ratio'])} | {n(r['beam_dense'])} | "
            f"{n(r['beam_moe'])} | {q(r['beam_ratio'], r['beam_buffers_ratio'])} | {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def scale_plot(rows: list, info: dict, path: Path) -> None:
    """Tokens/s against W (dense and MoE, per kind) and the MoE/dense ratios, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, kind in enumerate(("train", "valid", "beam", "dropless")):
        pts = [r for r in rows if r[f"{kind}_ratio"] is not None]
        if not pts:
            continue
        ws = [r["W"] for r in pts]
        if kind != "dropless":  # its dense is training's
            axes[0].plot(ws, [r[f"{kind}_dense"] for r in pts], f"C{i}--o", label=f"{kind} dense")
        axes[0].plot(ws, [r[f"{kind}_moe"] for r in pts], f"C{i}-s", label=f"{kind} MoE")
        axes[1].plot(ws, [r[f"{kind}_ratio"] for r in pts], f"C{i}-o", label=kind)
    for kind, target in SCALE_TARGETS.items():
        axes[1].axhline(target, color="grey", ls=":", lw=1)
        axes[1].annotate(f"{kind} target", (1, target), fontsize=7, color="grey")
    axes[0].set(title="global tokens/s", xlabel="processes W", xscale="log", yscale="log")
    axes[1].set(title="MoE / dense", xlabel="processes W", xscale="log", ylim=(0, 1.3))
    for ax in axes:
        ax.set_xticks([r["W"] for r in rows], [str(r["W"]) for r in rows])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.axvline(info["cores"], color="red", ls=":", lw=1)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{info['cpu']}, {info['cores']} cores (red: W = cores), 1 thread per process; "
        f"load {info['load_start']} -> {info['load_end']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_scale(a, res: dict, info: dict) -> list:
    """``scale.md`` and ``scale.png`` in ``--out``; returns the markdown's lines."""
    rows = scale_rows(res)
    md = scale_markdown(rows, info, a)
    out = Path(a.out)
    (out / "scale.md").write_text(md)
    scale_plot(rows, info, out / "scale.png")
    return md.splitlines()


# ----------------------------------------------------------------------------- driver


def passthrough(a):
    keys = (
        "databin",
        "out",
        "dim",
        "ffn",
        "layers",
        "heads",
        "experts",
        "top_k",
        "max_tokens",
        "dist_max_tokens",
        "updates",
        "dist_updates",
        "cli_updates",
        "warmup",
        "beam",
        "gen_len",
        "gen_batch_size",
        "gen_sentences",
        "gen_batches",
        "gen_reps",
        "cli_reps",
        "layer_reps",
        "valid_reps",
        "timeout",
    )
    flags = []
    for k in keys:
        flags += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    flags += ["--layer-tokens", ",".join(map(str, a.layer_tokens))]
    if a.profile:
        flags.append("--profile")
    if not a.cli:
        flags.append("--no-cli")
    flags.append("--dist-dropless" if a.dist_dropless else "--no-dist-dropless")
    return flags


def versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg, name in (("torch", "torch"), ("deepspeed", "deepspeed"), ("fairseq", "fairseq")):
        try:
            out[name] = md.version(pkg)
        except md.PackageNotFoundError:
            out[name] = "?"
    try:
        out["fairseq"] = md.version("fairseq-fixed") + " (fairseq-fixed)"
    except md.PackageNotFoundError:
        pass
    return out


def fmt(x, spec=".0f"):
    return "n/a" if x is None or x != x else format(x, spec)


def versus(r, key, part, variants=("moe_ds", "moe")):
    """A part's row of medians: ``dense N   moe_ds N (0.96x)   moe N (0.98x)   target >= T: met``.

    Args:
        r: the part's results (``dense_<key>``, ``<variant>_<key>``, ``<variant>_ratio``).
        key: which measurement (``wps_median``, ``tps_median``).
        part: the part, for its target (``TARGETS``), met by the ``moe`` ratio.
        variants: the MoE variants measured.
    """
    line = f"  dense {fmt(r[f'dense_{key}'])}"
    for name in variants:
        line += f"   {name} {fmt(r[f'{name}_{key}'])} ({r[f'{name}_ratio']:.2f}x)"
    target = TARGETS[part]
    return line + f"   target >= {target}: {'met' if r['moe_ratio'] >= target else 'MISSED'}"


def cli_row(what, dense, moe, tail):
    """A row of the command-line runs: ``  WHAT: dense N, moe N TAIL``."""
    return f"  {what}: dense {fmt(dense)}, moe {fmt(moe)} {tail}"


def layer_section(a, r):
    lines = [
        "[layer] one MoE layer vs a dense FFN, dense time / MoE time (median of "
        f"{a.layer_reps} interleaved reps)",
        f"  {'tokens':>7} {'fwd+bwd ds':>11} {'fwd+bwd':>8} {'eval ds':>8} {'eval':>6}  "
        f"{'peak MB dense':>13} {'ds':>6} {'moe':>6}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['tokens']:>7} {row['train_moe_ds_ratio']:>11.2f} {row['train_moe_ratio']:>8.2f} "
            f"{row['eval_moe_ds_ratio']:>8.2f} {row['eval_moe_ratio']:>6.2f}  "
            f"{row['peak_dense_bytes'] / 2**20:>13.1f} {row['peak_moe_ds_bytes'] / 2**20:>6.1f} "
            f"{row['peak_moe_bytes'] / 2**20:>6.1f}"
        )
    lines.append(
        "  peak memory growth (fit over the token counts): "
        + ", ".join(
            f"{k} {v['bytes_per_token'] / 1024:.1f} KiB/token, quadratic share "
            + (
                f"{v['quadratic_share']:.0%} ({'linear' if v['linear'] else 'NOT linear'})"
                if v["linear"] is not None
                else "n/a (needs 3 token counts)"
            )
            for k, v in r["memory_linearity"].items()
        )
    )
    return lines


def train_section(a, r):
    return [
        f"[train, 1 process] fairseq Trainer, --max-tokens {a.max_tokens}, {r['updates']} "
        f"updates after {r['warmup_updates']} warm-up (median tokens/s; load at end "
        f"{r['load_end']})",
        versus(r, "wps_median", "train"),
        "  parameters: " + ", ".join(f"{k} {v:,}" for k, v in r["params"].items()),
    ]


def generate_section(a, r):
    lines = [
        f"[generate, 1 process] beam {a.beam}, {r['sentences']} test sentences in batches of "
        f"{a.gen_batch_size}, every hypothesis {a.gen_len} tokens, {r['reps']} reps "
        f"(median tokens/s; load at end {r['load_end']})",
        versus(r, "tps_median", "generate"),
        "  local vs DeepSpeed path, identical hypotheses: "
        f"{r['local_vs_deepspeed_identical_hypotheses']}; busiest expert / even share per MoE "
        f"call (median): {r.get('routing_imbalance_median', float('nan')):.2f}",
    ]
    c = r.get("cli")
    if c:
        lines.append(
            cli_row(
                f"user/generate.py ({len(c['dense'])} runs each, alternating)",
                c["dense_tps_median"],
                c["moe_tps_median"],
                f"tokens/s (median ratio {c['moe_ratio']:.2f}x)",
            )
        )
    return lines


def dist_section(a, r):
    lines = [
        f"[train, 2 processes, gloo] MoE EP=2 vs dense data parallel (legacy_ddp), "
        f"--max-tokens {a.dist_max_tokens} per process, {r['updates']} updates (median "
        f"global tokens/s; load at end {r['load_end']})",
        versus(
            r, "wps_median", "dist", variants=DIST_VARIANTS[: 3 if "moe_dropless_ratio" in r else 1]
        ),
    ]
    if "moe_dropless_vs_buffers" in r:
        lines.append(
            "  moe_dropless: --no-moe-drop-tokens, the exchange; moe_dropless_buffers: the same "
            "on DeepSpeed's buffers at the capacity the ranks agree on; exchange / buffers "
            f"{r['moe_dropless_vs_buffers']:.2f}x"
        )
    v = r.get("valid")
    if v:
        lines.append(
            f"  validation ({v['batches']} batches, no token dropped): dense "
            f"{fmt(v['dense_wps_total'])}   moe {fmt(v['moe_wps_total'])} "
            f"({v['moe_ratio']:.2f}x)   moe buffer path "
            f"{fmt(v['moe_buffers_wps_total'])} ({v['moe_buffers_ratio']:.2f}x) tokens/s"
        )
    c = r.get("cli")
    if c:
        lines.append(
            cli_row(
                "torchrun user/train.py (sequential runs)",
                c["dense"]["wps_median"],
                c["moe"]["wps_median"],
                f"({c['moe_ratio']:.2f}x) wps",
            )
        )
    return lines


SECTIONS = {
    "layer": layer_section,
    "train": train_section,
    "generate": generate_section,
    "dist": dist_section,
}


def report(a, results, info):
    """The table: the run's machine and settings, then a section per part measured."""
    lines = [
        "",
        "=" * 78,
        f"MoE x{a.experts} top-{a.top_k} vs dense — {info['cpu']} ({info['cores']} cores), "
        f"OMP_NUM_THREADS={info['omp_threads']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"model: d={a.dim} ffn={a.ffn} layers={a.layers}+{a.layers} heads={a.heads}, MoE every "
        f"layer (enc,dec), {a.experts} experts, top-{a.top_k}, capacity factor 1.0 (train), no "
        "drop (inference)",
        f"load average: start {info['load_start']}, end {info['load_end']}",
        "'moe' = the plugin's default (local dispatch in one process; with expert parallelism "
        "and no token dropped, the exchange), 'moe_ds' / 'buffer path' = DeepSpeed's MOELayer "
        "path (FAIRSEQ_MOE_FAST_DISPATCH=0)",
    ]
    for part in PARTS:
        if part in results and part in SECTIONS:
            lines += ["", *SECTIONS[part](a, results[part])]
    lines.append("=" * 78)
    print("\n".join(lines), flush=True)
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated subset of {PARTS}"
    )
    ap.add_argument("--databin", default=str(REPO / "workspace" / "demo_en_de" / "databin"))
    ap.add_argument("--out", default=str(REPO / "workspace" / "bench_perf"))
    ap.add_argument("--dim", type=int, default=MODEL["dim"])
    ap.add_argument("--ffn", type=int, default=MODEL["ffn"])
    ap.add_argument("--layers", type=int, default=recipes.TINY["layers"])
    ap.add_argument("--heads", type=int, default=recipes.TINY["heads"])
    ap.add_argument("--experts", type=int, default=MODEL["experts"])
    ap.add_argument("--top-k", type=int, default=MODEL["top_k"])
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch, one process")
    ap.add_argument(
        "--dist-max-tokens", type=int, default=4096, help="tokens per batch and process"
    )
    ap.add_argument(
        "--updates", type=int, default=30, help="measured updates per model, one process"
    )
    ap.add_argument(
        "--dist-updates", type=int, default=20, help="measured updates per model, 2 processes"
    )
    ap.add_argument(
        "--cli-updates", type=int, default=15, help="measured updates of each torchrun run"
    )
    ap.add_argument("--warmup", type=int, default=3, help="updates not measured")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--gen-len", type=int, default=30, help="tokens of every hypothesis")
    ap.add_argument("--gen-batch-size", type=int, default=64)
    ap.add_argument("--gen-sentences", type=int, default=256)
    ap.add_argument("--gen-reps", type=int, default=2)
    ap.add_argument(
        "--gen-batches", type=int, default=3, help="scale: beam-search batches per process"
    )
    ap.add_argument("--cli-reps", type=int, default=2, help="user/generate.py runs per model")
    ap.add_argument(
        "--layer-tokens",
        default="1024,2048,4096,8192",
        type=lambda s: [int(x) for x in s.split(",")],
    )
    ap.add_argument("--layer-reps", type=int, default=7)
    ap.add_argument(
        "--profile", action="store_true", help="print torch.profiler tables of train updates"
    )
    ap.add_argument(
        "--no-cli",
        dest="cli",
        action="store_false",
        help="skip the user/generate.py and torchrun user/train.py runs",
    )
    ap.add_argument("--valid-reps", type=int, default=3, help="passes over the valid split")
    ap.add_argument(
        "--worlds",
        default="1,2,4,8",
        type=lambda s: [int(x) for x in s.split(",")],
        help="scale: process counts W (MoE with --ep-world-size W)",
    )
    ap.add_argument(
        "--scale-inference-worlds",
        default="2,4",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="scale: the W at which validation and beam search are measured too",
    )
    ap.add_argument(
        "--scale-updates", type=int, default=12, help="scale: measured updates per model and W"
    )
    ap.add_argument("--dist-valid", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dist-generate", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument(
        "--dist-dropless",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dist, scale: also train MoE with --no-moe-drop-tokens, on the exchange and on "
        "DeepSpeed's buffers",
    )
    ap.add_argument("--timeout", type=int, default=900, help="seconds per part")
    ap.add_argument("--quick", action="store_true", help="few updates and sentences (a smoke test)")
    ap.add_argument("--worker", choices=DEFAULT_PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.updates, a.dist_updates, a.cli_updates, a.warmup = 4, 3, 3, 1
        a.gen_sentences, a.gen_batch_size, a.gen_reps, a.gen_len, a.cli_reps = 32, 16, 1, 8, 1
        a.layer_tokens, a.layer_reps, a.max_tokens, a.dist_max_tokens = [512, 1024], 2, 1024, 512
        a.valid_reps, a.worlds, a.scale_inference_worlds = 1, [1, 2], [2]
        a.scale_updates, a.gen_batches = 3, 1
    return a


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.worker:
        quiet()
        import_plugin()
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if a.worker == "dist":
            part_dist_worker(a)
            return
        res = {
            "layer": part_layer,
            "train": part_train,
            "generate": part_generate,
        }[a.worker](a)
        Path(a.json).write_text(json.dumps(res))
        return
    if not (Path(a.databin) / "dict.en.txt").exists():
        sys.exit(f"no databin at {a.databin}: run `python scripts/prepare_demo.py` first")
    parts = [p for p in a.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoint_dense.pt", "checkpoint_moe.pt"):
        if "train" in parts and (out / stale).exists():
            (out / stale).unlink()
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "omp_threads": os.environ["OMP_NUM_THREADS"],
        "versions": versions(),
        "load_start": loadavg(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("worker", "json")},
    }
    print(
        f"bench-perf: {info['cpu']}, {info['cores']} cores, load {info['load_start']}, "
        f"OMP_NUM_THREADS={info['omp_threads']}; parts {parts}; output {out}",
        flush=True,
    )
    results, timing = {}, {}
    for part in parts:
        t0 = time.time()
        load0 = loadavg()
        print(f"-- {part} (load {load0})", flush=True)
        tmp = out / f"{part}.json"
        if part == "dist":
            res = part_dist(a)
        elif part == "scale":
            res = part_scale(a)
        else:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", part, "--json", tmp, *passthrough(a)],
                cwd=REPO,
                env=cli_env(),
                timeout=a.timeout,
            )
            if proc.returncode != 0:
                sys.exit(f"part {part} failed ({proc.returncode})")
            res = json.loads(tmp.read_text())
        res["load_start"] = load0
        results[part] = res
        timing[part] = round(time.time() - t0, 1)
        print(f"   {part}: {timing[part]} s (load {loadavg()})", flush=True)
    info["load_end"] = loadavg()
    info["part_seconds"] = timing
    lines = report(a, results, info)
    if "scale" in results:
        md = write_scale(a, results["scale"], info)
        print("\n".join(md) + f"\ntable: {out / 'scale.md'}, plot: {out / 'scale.png'}")
        lines += md
    (out / "results.json").write_text(
        json.dumps({"info": info, "results": results, "table": lines}, indent=1, default=str)
    )
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
