# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The training recipes, defined once for every script that trains.

- ``tiny``: ``make demo``'s model, the CPU default of ``run.sh``
  (``ARCH=transformer_ds_moe_tiny``), ``make bench``'s model, and with documented
  overrides ``make bench-perf``'s (wider, 8 experts). A 64-wide model whose
  embeddings are shared by encoder, decoder and output (the softmax over the
  demo's 7.9k pieces, not the layers, dominates its cost), 2 pre-norm layers a
  side, 4 experts 128 wide in every layer, top-2 (the compute per token of the
  256-wide dense FFN), no token dropped in training, a balancing bias of rate 0.001
  beside the gate loss (``make study``'s pick, docs/quality.md); no dropout, a high
  learning rate with a short warmup: BLEU 13.62 on the demo test set after 2000
  updates on 2 CPU cores.
- ``wmt``: the reference recipe (Vaswani et al. base on WMT16 en-de, 8192 tokens x 16
  batches an update), every other ``ARCH`` of ``run.sh``; the architecture keeps its
  own sizes.
- ``reference``: ``run.sh``'s ``RECIPE=reference``, the reference plugin's example
  command flag for flag but for ``CORRECTIONS`` (``--corrections`` prints them).
- ``MICRO``: not a training recipe: the smallest MoE model, trained in seconds by
  ``scripts/fault_run.py`` and the expert-parallel tests (``tests/ep_helpers.py``).

A recipe is a dict of settings (model size, regularization, optimization, MoE
layout and loss, batch size, update budget, decoding, and ``run.sh``'s logging,
saving and benchmark cadence for it). ``settings(name, **overrides)`` copies one
with overrides; ``train_flags(settings, moe)`` turns settings into the
recipe's ``fairseq-train`` flags: task, architecture and sizes, dropout, MoE
layers and criterion (or the dense criterion), optimizer and schedule. A caller
adds what is its own: data, languages, batch size, budget, seed, device,
logging, checkpoints, validation, and user options last.

Why a Python module: the recipes are parameterized (``make demo``'s sizes come
from environment variables, ``bench.py``'s and ``bench_perf.py``'s from their
options, the gate-loss weight goes inside a JSON value), which a flat flag file
could not express without a template language of its own; the Python scripts
import it, and the bash scripts read it through its command line, one value a
line (so values with spaces, quotes or JSON need no quoting; ``read_values`` and
``read_lines`` in ``scripts/lib.sh``), at the cost of a Python start-up (about
0.05 s: nothing heavy is imported)::

    python -m mt_run.recipes tiny [SETTING=VALUE ...]            # name=value lines
    python -m mt_run.recipes tiny [SETTING=VALUE ...] --flags [--dense]
    python -m mt_run.recipes reference --corrections             # one a line

An empty ``VALUE`` means "not passed" (the architecture's or fairseq's default). A
value its setting cannot take (``ffn=abc``, ``top_k=0``) stops the command with one line
naming the setting and what it takes, exit status 2: ``run.sh`` and ``make demo`` check
their overrides so before any work.
"""

import argparse
import json
import math
import re
import sys

# what the recipes share
_COMMON = {
    # MoE layers (--deepspeed_moe, --num-experts, --top-k, --moe-freq, --ep-world-size;
    # None: the plugin's default) and the criterion: model_and_base, the gate loss
    # weighted by gate_weight (0.01, not the reference's 10: see README, "Choosing the
    # gate-loss weight") over label-smoothed cross-entropy
    "moe_sides": "enc,dec",
    "top_k": 1,
    "ep_world_size": None,
    "gate_weight": 0.01,
    # capacity and router regularisation (docs/moe-options.md; None: the plugin's default):
    # --moe-capacity-factor, --no-moe-drop-tokens when drop_tokens is 0 (dropless
    # training), --moe-z-loss with z_loss_weight as experts_z_loss's weight, --moe-eom,
    # --moe-expert-dropout, --moe-bias-balance
    "capacity_factor": None,
    "drop_tokens": 1,
    "z_loss_weight": None,
    "eom": None,
    "expert_dropout": None,
    "bias_balance": None,
    "label_smoothing": 0.1,
    # the dense baseline's criterion: label_smoothed_cross_entropy (the reference's
    # baseline), or model_and_base without gate loss (the same criterion code as MoE)
    "dense_criterion": "label_smoothed_cross_entropy",
    # batch tokens per process on GPUs (max_tokens_cpu: on CPU), batches per update
    "max_tokens_gpu": 4096,
    "update_freq": 1,
    "warmup_init_lr": "1e-07",
    # run.sh: direction, validation and checkpoints
    "src": "en",
    "tgt": "de",
    "validate_interval": None,  # --validate-interval-updates (None: every epoch)
    "keep_last_epochs": None,  # epoch checkpoints kept (None: --no-epoch-checkpoints)
    # BLEU during training with this beam (None: none), the best checkpoint by BLEU
    "eval_bleu_beam": None,
    # decoding (generate, BLEU during training)
    "beam": 4,
    "max_len_a": 1.2,
    "max_len_b": 10,
}

TINY = {
    "arch": "transformer_ds_moe_tiny",
    "dim": 64,
    "ffn": 128,  # 2 experts a token (top_k): the 256-wide dense FFN's compute
    "layers": 2,
    "heads": 4,
    "share_all_embeddings": 1,
    "pre_norm": 1,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "experts": 4,
    "moe_freq": 1,
    "lr": 0.007,
    "warmup": 100,
    "clip_norm": 1.0,
    "weight_decay": None,
    "max_tokens_cpu": 1024,
    "max_update": 2000,
    "lenpen": 1.0,
    # run.sh: --log-interval, --save-interval-updates, BENCH_UPDATES
    "log_interval": 10,
    "save_interval": 200,
    "bench_updates": 30,
    **_COMMON,
    # make study's pick (docs/quality.md): top-2 of experts half as wide, dropless
    # training, the balancing bias (DeepSeek-V3) beside the gate loss
    "top_k": 2,
    "drop_tokens": 0,
    "bias_balance": 0.001,
}

WMT = {
    "arch": "transformer_ds_moe_wmt_en_de",
    "dim": None,
    "ffn": None,
    "layers": None,
    "heads": None,
    "share_all_embeddings": 0,
    "pre_norm": 0,
    "dropout": 0.3,
    "attention_dropout": None,
    "experts": 8,
    "moe_freq": 2,
    "lr": "5e-4",  # spelled as the reference spells it
    "warmup": 4000,
    "clip_norm": 0.0,
    "weight_decay": 0.0001,
    "max_tokens_cpu": 2048,
    "max_update": 300000,
    "lenpen": 0.6,
    "log_interval": 100,
    "save_interval": 1000,
    "bench_updates": 200,
    **_COMMON,
    # the reference's batch: 8192 tokens a process, 16 batches an update (about 1M tokens
    # per update on 8 GPUs, its table's "train ntokens/batch")
    "max_tokens_gpu": 8192,
    "update_freq": 16,
}

# The reference plugin's example command (its README), flag for flag but for
# CORRECTIONS: the WMT recipe on its example architecture, German to English, BLEU
# during training every 20 updates, a checkpoint every 100.
REFERENCE = {
    **WMT,
    "arch": "transformer_ds_moe_tiny",
    "src": "de",
    "tgt": "en",
    "warmup_init_lr": None,
    "validate_interval": 20,
    "save_interval": 100,
    "keep_last_epochs": 1,
    "eval_bleu_beam": 5,
    "moe_freq": None,  # not passed: the architecture's
}

RECIPES = {"tiny": TINY, "wmt": WMT, "reference": REFERENCE}


def _number(value):
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _number_where(ok):
    """A check: the text is a finite number for which ``ok`` holds."""

    def check(value):
        x = _number(value)
        return x is not None and ok(x)

    return check


def _whole(value):
    return re.fullmatch("[0-9]+", value) is not None


def _json_number(value):
    """``value`` (a number, or its text as typed: ``.1``, ``1e-3``) as JSON writes it."""
    return json.dumps(float(value))


def _sides(value):
    """``moe_sides``' parts, as the plugin's ``--deepspeed_moe`` reads them."""
    return {part.strip() for part in value.split(",")}


# what a setting's value may be (None, "not passed", always may), and how to say so
_KINDS = {
    "count": ("a whole number of at least 1", lambda v: _whole(v) and int(v) >= 1),
    "whole": ("a whole number", _whole),
    "switch": ("0 or 1", lambda v: v in ("0", "1")),
    "fraction": ("a number from 0 up to, not including, 1", _number_where(lambda x: 0 <= x < 1)),
    "positive": ("a number above 0", _number_where(lambda x: x > 0)),
    "nonnegative": ("a number of at least 0", _number_where(lambda x: x >= 0)),
    "number": ("a number", _number_where(lambda x: True)),
    "sides": ("enc, dec or both (enc,dec)", lambda v: _sides(v) <= {"enc", "dec"}),
    "criterion": (
        "label_smoothed_cross_entropy or model_and_base",
        lambda v: v in ("label_smoothed_cross_entropy", "model_and_base"),
    ),
    "text": ("a name", bool),
}
_KIND = {
    **dict.fromkeys(("arch", "src", "tgt"), "text"),
    **dict.fromkeys(("dim", "ffn", "layers", "heads", "experts", "top_k", "moe_freq"), "count"),
    **dict.fromkeys(("ep_world_size", "max_tokens_gpu", "max_tokens_cpu", "update_freq"), "count"),
    **dict.fromkeys(("max_update", "log_interval", "save_interval", "bench_updates"), "count"),
    **dict.fromkeys(("validate_interval", "eval_bleu_beam", "beam"), "count"),
    **dict.fromkeys(("warmup", "keep_last_epochs", "max_len_b"), "whole"),
    **dict.fromkeys(("share_all_embeddings", "pre_norm", "drop_tokens"), "switch"),
    **dict.fromkeys(("dropout", "attention_dropout", "eom", "label_smoothing"), "fraction"),
    "expert_dropout": "fraction",
    **dict.fromkeys(("lr", "capacity_factor"), "positive"),
    **dict.fromkeys(("gate_weight", "z_loss_weight", "clip_norm", "weight_decay"), "nonnegative"),
    **dict.fromkeys(("warmup_init_lr", "max_len_a", "bias_balance"), "nonnegative"),
    "lenpen": "number",
    "moe_sides": "sides",
    "dense_criterion": "criterion",
}

#: What a recipe changes from the command it follows, and why (run.sh prints them).
CORRECTIONS = {
    "reference": [
        "--loss-weights experts_gate_loss 0.01, not 10: the gate loss is a per-token mean here, "
        "the reference added it unscaled to a token sum (its 10 acted like about 1e-5 here)",
        "no --reset-optimizer: it would throw Adam's state away at every resume",
        "--eval-bleu-remove-bpe sentencepiece, not the bare flag (subword-nmt's '@@ '): BLEU "
        "over words, not sentencepiece pieces",
    ],
}

# the smallest MoE model (1 layer a side, 16 wide, 4 experts in every layer), json logs
# at every update; callers add --seed, checkpoint intervals and what else they test
# fmt: off
MICRO = [
    "--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "24",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--deepspeed_moe", "enc,dec", "--num-experts", "4", "--moe-freq", "1",
    "--criterion", "model_and_base",
    "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 0.1}',
    "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "400", "--dropout", "0.1",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--num-workers", "0",
    "--no-epoch-checkpoints",
]
# fmt: on


def settings(name, **overrides):
    """A copy of recipe ``name`` with ``overrides``.

    Args:
        name: ``tiny``, ``wmt`` or ``reference``.
        overrides: settings to replace; ``None`` (or ``""``) means "not passed".

    Raises:
        KeyError: an unknown recipe or setting (its message names the known ones).
        ValueError: a value its setting cannot take (``ffn=abc: give a whole number of
            at least 1``).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}: choose from {sorted(RECIPES)}")
    out = dict(RECIPES[name])
    unknown = sorted(set(overrides) - set(out))
    if unknown:
        raise KeyError(f"recipe {name!r} has no setting {unknown}: known are {sorted(out)}")
    out.update({k: None if v == "" else v for k, v in overrides.items()})
    for key, value in overrides.items():
        what, fits = _KINDS[_KIND[key]]
        if value is not None and value != "" and not fits(str(value)):
            raise ValueError(f"{key}={value}: give {what}")
    return out


def train_flags(s, moe=True):
    """The recipe's ``fairseq-train`` flags for settings ``s`` (from ``settings``).

    Args:
        s: the settings.
        moe: MoE layers and the gate loss; False: the dense twin, with
            ``s["dense_criterion"]``.

    ``ffn`` is an expert's width. A dense FFN (every layer of the dense twin, and of a
    side without MoE layers) is ``top_k`` times as wide: the compute per token of the
    ``top_k`` experts a token passes through. (With ``moe_freq`` > 1 the dense layers
    between MoE layers keep ``ffn``: fairseq has one FFN width a side.)
    """

    def given(*pairs):
        return [str(x) for flag, value in pairs if value is not None for x in (flag, value)]

    side_name = {"enc": "encoder", "dec": "decoder"}
    moe_sides = {side_name[x] for x in _sides(str(s["moe_sides"])) if moe and x in side_name}
    flags = ["--task", "translation_deepspeed", "--arch", str(s["arch"])]
    if str(s["share_all_embeddings"]) == "1":
        flags.append("--share-all-embeddings")
    for part, key in (
        ("embed-dim", "dim"),
        ("ffn-embed-dim", "ffn"),
        ("layers", "layers"),
        ("attention-heads", "heads"),
    ):
        for side in ("encoder", "decoder"):
            value = s[key]
            if key == "ffn" and value is not None and side not in moe_sides:
                value = int(value) * int(s["top_k"] or 1)
            if value is not None:
                flags += [f"--{side}-{part}", str(value)]
    if str(s["pre_norm"]) == "1":
        flags += ["--encoder-normalize-before", "--decoder-normalize-before"]
    flags += given(("--dropout", s["dropout"]), ("--attention-dropout", s["attention_dropout"]))
    base = [
        "--base-criterion",
        "label_smoothed_cross_entropy",
        "--base-criterion-config",
        f'{{"label_smoothing": {_json_number(s["label_smoothing"])}}}',
    ]
    if moe:
        flags += given(
            ("--deepspeed_moe", s["moe_sides"]),
            ("--num-experts", s["experts"]),
            ("--top-k", s["top_k"]),
            ("--moe-freq", s["moe_freq"]),
            ("--ep-world-size", s["ep_world_size"]),
        )
        flags += given(
            ("--moe-capacity-factor", s["capacity_factor"]),
            ("--moe-eom", s["eom"]),
            ("--moe-expert-dropout", s["expert_dropout"]),
            ("--moe-bias-balance", s["bias_balance"]),
        )
        if str(s["drop_tokens"]) == "0":
            flags.append("--no-moe-drop-tokens")
        weights = f'"base_crit": 1, "experts_gate_loss": {_json_number(s["gate_weight"])}'
        if s["z_loss_weight"] is not None:
            flags.append("--moe-z-loss")
            weights += f', "experts_z_loss": {_json_number(s["z_loss_weight"])}'
        flags += ["--criterion", "model_and_base", "--loss-weights", f"{{{weights}}}", *base]
    elif s["dense_criterion"] == "model_and_base":
        flags += ["--criterion", "model_and_base", "--loss-weights", '{"base_crit": 1}', *base]
    elif s["dense_criterion"] == "label_smoothed_cross_entropy":
        flags += [
            "--criterion",
            "label_smoothed_cross_entropy",
            "--label-smoothing",
            str(s["label_smoothing"]),
        ]
    else:
        raise ValueError(
            f"dense_criterion {s['dense_criterion']!r}: use "
            "label_smoothed_cross_entropy or model_and_base"
        )
    flags += ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)"]
    flags += given(
        ("--weight-decay", s["weight_decay"]), ("--clip-norm", s["clip_norm"]), ("--lr", s["lr"])
    )
    flags += [
        "--lr-scheduler",
        "inverse_sqrt",
        *given(("--warmup-updates", s["warmup"]), ("--warmup-init-lr", s["warmup_init_lr"])),
    ]
    if s["eval_bleu_beam"] is not None:
        beam = {"beam": int(s["eval_bleu_beam"])}
        beam.update(max_len_a=float(s["max_len_a"]), max_len_b=int(s["max_len_b"]))
        flags += ["--eval-bleu", "--scoring", "sacrebleu", "--eval-bleu-args", json.dumps(beam)]
        flags += ["--eval-bleu-detok", "moses", "--eval-bleu-remove-bpe", "sentencepiece"]
        flags += ["--eval-bleu-print-samples", "--best-checkpoint-metric", "bleu"]
        flags += ["--maximize-best-checkpoint-metric"]
    return flags


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mt_run.recipes",
        description="Print a recipe's settings (name=value lines) or, with --flags, its "
        "fairseq-train flags (one a line).",
    )
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("overrides", nargs="*", metavar="SETTING=VALUE")
    p.add_argument("--flags", action="store_true", help="print the flags, not the settings")
    p.add_argument("--dense", action="store_true", help="with --flags: the dense model")
    p.add_argument(
        "--corrections",
        action="store_true",
        help="print what the recipe changes from the command it follows, one a line",
    )
    args = p.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides are SETTING=VALUE, not {bad}")
    try:
        s = settings(args.recipe, **dict(o.split("=", 1) for o in args.overrides))
        if args.corrections:
            lines = CORRECTIONS.get(args.recipe, [])
        elif args.flags:
            lines = train_flags(s, moe=not args.dense)
        else:
            lines = [f"{k}={'' if v is None else v}" for k, v in s.items()]
    except (KeyError, ValueError) as e:  # one line, no usage: the setting is the news
        sys.stderr.write(f"{p.prog}: error: {e.args[0]}\n")
        sys.exit(2)
    sys.stdout.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
