# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The MoE flags and every check on the plugin's flags: two tables.

* :data:`FLAGS`, the MoE flag table: each row is one flag (or an on/off pair), the
  :class:`MoEOptions` field it fills, its help and, where a value can be wrong on its
  own, its check. ``add_moe_args``, ``moe_defaults`` and ``options_from_args`` are
  generated from it; the defaults are :class:`MoEOptions`' field defaults.
* :data:`RULES`, the checks that involve several flags or the run (processes, GPUs,
  task, data directory, checkpoint files, criterion). :func:`validate` runs them; the
  entry points (``user/train.py``, ``user/generate.py``) call it before any work, the
  task when fairseq sets it up and builds the model (so ``fairseq-train --user-dir
  user`` gets the same checks). Each failed check is one line naming the flag and the
  fix.

Pure Python at import (no DeepSpeed); the criterion checks import fairseq's registries
when they run. Our own flags are named after DeepSpeed's ``MoE`` arguments
(``capacity_factor`` -> ``--moe-capacity-factor``); ``--deepspeed_moe``,
``--num-experts``, ``--ep-world-size`` and ``--top-k`` follow the reference CLI.
Adding an MoE flag: a field of :class:`MoEOptions`, a row of :data:`FLAGS`, its use,
a test.
"""

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, FrozenSet, Optional, Sequence, Tuple

from .errors import PluginError

logger = logging.getLogger(__name__)
SIDES = ("enc", "dec")
NOISY_GATE_POLICIES = ("None", "Jitter", "RSample")
CONSOLE_METRICS = ("summary", "all")


class MoEArgumentError(PluginError, ValueError):
    """A bad flag value; the message names the flag and the fix."""


@dataclass(frozen=True)
class MoEOptions:
    """Validated options of every MoE layer in a model (the defaults are the flags').

    Args:
        sides: subset of ``{"enc", "dec"}`` that gets MoE layers.
        num_experts (int): experts per MoE layer (all ranks together).
        ep_size (int): expert-parallel world size.
        top_k (int): experts per token.
        freq (int): every ``freq``-th layer is MoE (1 = all layers).
        capacity_factor (float): expert capacity factor in training.
        eval_capacity_factor (float): the same in evaluation when tokens are dropped.
        min_capacity (int): minimum slots per expert.
        noisy_gate_policy (str or None): ``None``, ``"Jitter"`` or ``"RSample"``.
        drop_tokens (bool): drop tokens over capacity in training.
        eval_drop_tokens (bool): drop tokens over capacity in evaluation/inference.
        use_rts (bool): random token selection when over capacity.
        use_residual (bool): residual MoE (PR-MoE): a dense MLP beside the experts.
        top2_2nd_expert_sampling (bool): top-2 picks the 2nd expert with Gumbel noise.
        console_metrics (str): the routing metrics fairseq's console progress bars print,
            ``"summary"`` or ``"all"`` (logging only: see :mod:`user.expert_stats`).
        z_loss (bool): the model also returns the router z-loss (ST-MoE),
            ``experts_z_loss``, for ``--loss-weights`` to weigh.
        eom (float): expert output masking (NLLB-200): in training, each route's expert
            output is dropped with this probability.
        expert_dropout (float or None): dropout after the experts' activation in
            training, in place of ``--activation-dropout``; None = that flag's value.
        bias_balance (float): auxiliary-loss-free balancing (DeepSeek-V3): the rate a
            per-expert routing bias moves by after each update; 0 = off.
    """

    sides: FrozenSet[str] = frozenset()
    num_experts: int = 8
    ep_size: int = 1
    top_k: int = 1
    freq: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    noisy_gate_policy: Optional[str] = None
    drop_tokens: bool = True
    eval_drop_tokens: bool = False
    use_rts: bool = True
    use_residual: bool = False
    top2_2nd_expert_sampling: bool = True
    console_metrics: str = "summary"
    z_loss: bool = False
    eom: float = 0.0
    expert_dropout: Optional[float] = None
    bias_balance: float = 0.0

    def is_moe_layer(self, side: str, index: int) -> bool:
        """Whether layer ``index`` (0-based) of ``side`` is an MoE layer (GShard: every freq-th)."""
        return side in self.sides and (index + 1) % self.freq == 0


def parse_sides(value: Optional[str]) -> FrozenSet[str]:
    """Parse ``--deepspeed_moe``: ``""``/None -> dense, else a comma list of enc/dec."""
    if value is None or value.strip() == "":
        return frozenset()
    parts = [p.strip() for p in value.split(",")]
    bad = [p for p in parts if p not in SIDES]
    if bad:
        raise MoEArgumentError(
            f"--deepspeed_moe {value!r}: unknown part {bad[0]!r}; use enc, dec or enc,dec "
            f"(or leave it out for a dense model)"
        )
    return frozenset(parts)


def parse_json_flag(flag: str, text: Optional[str], example: str) -> dict:
    """A flag whose value is a JSON object; one line naming the flag when it is not."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise MoEArgumentError(
            f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {text!r}; "
            f"expected e.g. '{example}'"
        ) from None
    if not isinstance(value, dict):
        raise MoEArgumentError(f"{flag} must be a JSON object, got {text!r}")
    return value


# --------------------------------------------------------------------------- the flag table


@dataclass(frozen=True)
class Flag:
    """One row of the MoE flag table.

    Args:
        field (str): the :class:`MoEOptions` field it sets.
        names (tuple): the flag and its aliases (``dest`` comes from the first).
        old (tuple): deprecated spellings (the reference plugin's): the same flag, with
            a warning naming the new spelling when one is used.
        help (str): the flag's help; for an on/off pair, the "on" flag's.
        type: argparse type (``None`` for an on/off pair).
        metavar, choices: as argparse's.
        off (str, optional): the "off" flag of an on/off pair, with ``off_help``.
        check: ``value -> problem`` for a value that is wrong on its own ("must be ...").
        parse: turns the parsed value into the field's value (e.g. ``--deepspeed_moe``).
    """

    field: str
    names: Tuple[str, ...]
    help: str
    old: Tuple[str, ...] = ()
    type: Optional[Callable] = None
    metavar: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    off: Optional[str] = None
    off_help: Optional[str] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    parse: Optional[Callable[[Any], Any]] = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")

    @property
    def default(self):
        return {f.name: f.default for f in fields(MoEOptions)}[self.field]


def _at_least(n):
    return lambda v: None if v >= n else f"must be {'at least 1' if n == 1 else f'>= {n}'}"


def _positive(v):
    return None if v > 0 and math.isfinite(v) else "must be a finite positive number"


def _probability(v):
    # a probability of 1 would drop everything (and divide by zero when rescaling)
    return None if v is None or 0 <= v < 1 else "must be a probability, 0 <= P < 1"


# fmt: off
FLAGS: Tuple[Flag, ...] = (
    Flag("sides", ("--deepspeed_moe", "--deepspeed-moe"), type=str, metavar="enc|dec|enc,dec",
         help="replace FFN blocks by DeepSpeed MoE layers in the encoder, decoder or both; "
              "absent or empty = dense model", parse=parse_sides),
    Flag("num_experts", ("--num-experts",), type=int, metavar="N", check=_at_least(1),
         help="experts per MoE layer, all processes together (default 8)"),
    Flag("ep_size", ("--ep-world-size",), type=int, metavar="E", check=_at_least(1),
         help="expert-parallel world size: experts are split over E processes; "
              "must divide --num-experts and the number of processes (default 1)"),
    Flag("top_k", ("--top-k",), type=int, metavar="K",
         help="experts per token, 1 <= K <= --num-experts (default 1)"),
    Flag("freq", ("--moe-freq",), type=int, metavar="N",
         check=lambda v: None if v >= 1 else "must be at least 1 (1 = every layer)",
         help="every N-th layer of an MoE side is MoE, 1 = every layer (default 2)"),
    Flag("capacity_factor", ("--moe-capacity-factor",), type=float, metavar="F",
         check=_positive, parse=float,
         help="DeepSpeed capacity_factor: training capacity per expert is "
              "ceil(tokens / experts * F) (x2 for top-2) (default 1.0)"),
    Flag("eval_capacity_factor", ("--moe-eval-capacity-factor",), type=float, metavar="F",
         check=_positive, parse=float,
         help="DeepSpeed eval_capacity_factor, used in evaluation when "
              "--moe-eval-drop-tokens is set (default 1.0)"),
    Flag("min_capacity", ("--moe-min-capacity",), type=int, metavar="N", check=_at_least(0),
         old=("--min-capacity",),
         help="DeepSpeed min_capacity: minimum slots per expert (default 4)"),
    Flag("noisy_gate_policy", ("--moe-noisy-gate-policy",), choices=NOISY_GATE_POLICIES,
         old=("--noisy-gate-policy",), parse=lambda v: None if v == "None" else v,
         help="DeepSpeed noisy_gate_policy (top-1 only) (default None)"),
    Flag("drop_tokens", ("--moe-drop-tokens",), off="--no-moe-drop-tokens", parse=bool,
         help="drop tokens over expert capacity in training (default)",
         off_help="never drop tokens in training (capacity = largest expert load)"),
    Flag("eval_drop_tokens", ("--moe-eval-drop-tokens",), off="--no-moe-eval-drop-tokens",
         parse=bool, help="drop tokens over capacity in evaluation and generation too",
         off_help="never drop tokens in evaluation and generation (default)"),
    Flag("use_rts", ("--moe-use-rts",), off="--no-moe-use-rts", parse=bool,
         help="DeepSpeed use_rts: random token selection over capacity (default)",
         off_help="keep the first tokens instead of a random selection"),
    Flag("use_residual", ("--moe-use-residual",), parse=bool,
         help="DeepSpeed use_residual: residual MoE (PR-MoE)"),
    Flag("top2_2nd_expert_sampling", ("--moe-top2-2nd-expert-sampling",),
         off="--no-moe-top2-2nd-expert-sampling", parse=bool,
         help="DeepSpeed top2_2nd_expert_sampling: top-2 samples the second expert with "
              "Gumbel noise in training (default)",
         off_help="top-2 takes the second-best expert"),
    Flag("console_metrics", ("--moe-console-metrics",), choices=CONSOLE_METRICS,
         help="routing metrics in the console's log lines (--log-format simple or tqdm): "
              "summary = moe_imbalance, moe_drop, moe_ent; all = also each MoE layer's "
              "moe_<layer>_* scalars, which json, TensorBoard, wandb and aim always get "
              "(default summary)"),
    Flag("z_loss", ("--moe-z-loss",), parse=bool,
         help="router z-loss (ST-MoE): the model also returns experts_z_loss, the mean over "
              "real tokens of logsumexp(router logits)^2 of each MoE layer, summed over "
              "layers; give its weight in --loss-weights, e.g. \"experts_z_loss\": 0.001 "
              "(default off)"),
    Flag("eom", ("--moe-eom",), type=float, metavar="P", check=_probability, parse=float,
         help="expert output masking (NLLB-200): in training, drop each route's expert "
              "output with probability P, scaling the kept ones by 1 / (1 - P) "
              "(default 0: off)"),
    Flag("expert_dropout", ("--moe-expert-dropout",), type=float, metavar="P",
         check=_probability, parse=float,
         help="dropout after the experts' activation in training, in place of "
              "--activation-dropout (default: --activation-dropout's value)"),
    Flag("bias_balance", ("--moe-bias-balance",), type=float, metavar="RATE",
         check=lambda v: None if v >= 0 and math.isfinite(v) else "must be 0 or more",
         parse=float,
         help="balancing without an auxiliary loss (DeepSeek-V3): a per-expert bias, "
              "added to the router's probabilities when choosing experts (not to their "
              "weights), moves by RATE after each update, up for experts below the mean "
              "load, down above it (over every process); saved with the model; e.g. "
              "0.001, with \"experts_gate_loss\": 0 or a small weight (default 0: off)"),
)
# fmt: on


class _StoreWarningOldSpellings(argparse.Action):
    """argparse's ``store``, also under deprecated spellings: using one logs a warning
    naming the new spelling (once per parser: fairseq may parse a command line twice).

    argparse tells an action the option string it matched, so ``--min-capacity=4`` is
    recognised too, wherever fairseq adds the model's flags (``fairseq-train``,
    ``user/train.py``; generation takes them from the checkpoint), and the value lands in
    the new flag's ``dest`` only.
    """

    def __init__(self, option_strings, dest, old=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old = tuple(old)
        self._warned = False

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if option_string in self.old and not self._warned:
            self._warned = True
            logger.warning(
                f"{option_string} is deprecated (the reference plugin's spelling): use "
                f"{self.option_strings[0]}, which it sets; unlike the reference plugin, the "
                "value is used"
            )


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    """Add the MoE flags. Defaults are set by the architectures (fairseq's model
    flags are parsed with ``argparse.SUPPRESS``), see :func:`moe_defaults`."""
    for f in FLAGS:
        if f.old:
            assert f.type is not None or f.choices is not None, f"{f.old}: a valued flag only"
            help = f"{f.help}; {', '.join(f.old)}: deprecated spelling"
            parser.add_argument(
                *f.names, *f.old, action=_StoreWarningOldSpellings, old=f.old,
                type=f.type, metavar=f.metavar, choices=f.choices, help=help,
            )  # fmt: skip
        elif f.type is not None or f.choices is not None:
            parser.add_argument(
                *f.names, type=f.type, metavar=f.metavar, choices=f.choices, help=f.help
            )
        else:
            parser.add_argument(*f.names, dest=f.dest, action="store_true", help=f.help)
            if f.off is not None:
                parser.add_argument(f.off, dest=f.dest, action="store_false", help=f.off_help)


def moe_defaults(args) -> None:
    """Fill in MoE defaults on an architecture's ``args`` (keeps given values)."""
    for f in FLAGS:
        if f.field == "sides":
            args.deepspeed_moe = getattr(args, "deepspeed_moe", None) or ""
        else:
            setattr(args, f.dest, getattr(args, f.dest, f.default))


def options_from_args(args) -> MoEOptions:
    """Validate the MoE flags on ``args`` and return them as :class:`MoEOptions`.

    Runs each flag's own check, then the :data:`RULES` that need only the flags.

    Raises:
        MoEArgumentError: with a message naming the flag and the fix.
    """
    values = {}
    for f in FLAGS:
        v = getattr(args, f.dest, None)
        if f.field == "sides" or v is not None:
            values[f.field] = f.parse(v) if f.parse is not None else v
    opts = MoEOptions(**values)
    if not opts.sides:
        return opts  # dense: MoE values are not used, so not checked
    for f in FLAGS:
        problem = f.check(getattr(opts, f.field)) if f.check is not None else None
        if problem:
            raise MoEArgumentError(f"{f.names[0]} {getattr(opts, f.field)}: {problem}")
    _run(RULES_ON_OPTIONS, opts, args)
    return opts


# --------------------------------------------------------------------------- the rules


def _divisible(opts, args):
    if opts.num_experts % opts.ep_size:
        return (
            f"--num-experts {opts.num_experts} is not divisible by --ep-world-size "
            f"{opts.ep_size}: each expert-parallel rank holds num_experts / ep_world_size "
            f"experts; use a multiple of {opts.ep_size} experts or a divisor of "
            f"{opts.num_experts} as --ep-world-size"
        )


def _top_k_range(opts, args):
    if not 1 <= opts.top_k <= opts.num_experts:
        return (
            f"--top-k {opts.top_k} is out of range: it must be between 1 and "
            f"--num-experts ({opts.num_experts})"
        )


def _noisy_gate_top1(opts, args):
    if opts.noisy_gate_policy is not None and opts.top_k != 1:
        return (
            f"--moe-noisy-gate-policy {opts.noisy_gate_policy} works with --top-k 1 only "
            f"(DeepSpeed ignores it for top-{opts.top_k}); drop the flag or use --top-k 1"
        )


def _bias_without_sampled_choice(opts, args):
    if opts.bias_balance > 0 and opts.noisy_gate_policy == "RSample":
        return (
            f"--moe-bias-balance {opts.bias_balance} with --moe-noisy-gate-policy RSample: "
            "RSample chooses the expert from noised logits, where the bias has no say; "
            "drop one of them"
        )


def _placement(opts, args):
    for side, flag in (("enc", "--encoder-layers"), ("dec", "--decoder-layers")):
        layers = getattr(args, "encoder_layers" if side == "enc" else "decoder_layers", 0)
        if (
            side in opts.sides
            and layers
            and not any(opts.is_moe_layer(side, i) for i in range(layers))
        ):
            return (
                f"--deepspeed_moe {args.deepspeed_moe} with --moe-freq {opts.freq} and "
                f"{flag} {layers} places no MoE layer in the "
                f"{'encoder' if side == 'enc' else 'decoder'}; use --moe-freq 1 or more layers"
            )


#: Rules on the MoE options alone (checked whenever a model is built).
RULES_ON_OPTIONS = (
    _divisible,
    _top_k_range,
    _noisy_gate_top1,
    _bias_without_sampled_choice,
    _placement,
)


@dataclass(frozen=True)
class Run:
    """What the context rules may know about the run; ``None`` = not known here.

    Args:
        argv (list): the raw command line (before fairseq parses it).
        cuda (bool): whether a GPU is used.
        world (int): processes in the run.
        task (str): the task's registered name.
        command (str): the fairseq CLI that runs: ``"train"``, ``"generate"`` or
            ``"interactive"`` (known to the entry points only).
    """

    argv: Optional[Sequence[str]] = None
    cuda: Optional[bool] = None
    world: Optional[int] = None
    task: Optional[str] = None
    command: Optional[str] = None


def flag_given(argv: Sequence[str], flag: str) -> bool:
    """Whether a raw command line has ``flag`` (as ``--flag`` or ``--flag=...``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of ``flag`` on a raw command line (None when absent)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _moe_arch(args, run):
    """(argv) fairseq would reject --deepspeed_moe as unknown for a dense architecture."""
    arch = flag_value(run.argv, "--arch") or flag_value(run.argv, "-a")
    if (
        flag_given(run.argv, "--deepspeed_moe")
        and arch
        and not arch.startswith("transformer_ds_moe")
    ):
        twin = arch[len("transformer") :] if arch.startswith("transformer") else ""
        return (
            f"--deepspeed_moe needs a transformer_ds_moe_* architecture, not --arch {arch}: "
            f"use --arch transformer_ds_moe{twin}"
        )


def _half_needs_gpu(args, run):
    """(cuda) fairseq's fp16 training does not run on the CPU."""
    half = [
        f
        for f, dest in (("--fp16", "fp16"), ("--memory-efficient-fp16", "memory_efficient_fp16"))
        if getattr(args, dest, False)
    ]
    if half and (not run.cuda or getattr(args, "cpu", False)):
        return (
            f"{half[0]} needs a CUDA GPU (fairseq's fp16 training does not run on the "
            "CPU): drop it to train in fp32 on the CPU"
        )


def _split_paths(value: str):
    """fairseq's split of a ``DATA1:DATA2`` or ``a.pt:b.pt`` value."""
    from fairseq.utils import split_paths

    return split_paths(value)


def _data_directory(args, run):
    """(task) every shard of the data path exists (fairseq reads shard ``i`` in epoch
    ``i`` only: a missing one failed hours later), and the first, where fairseq reads the
    dictionaries from, has the languages'."""
    data = getattr(args, "data", None)
    if run.task != "translation_deepspeed" or not data:
        return None
    shards = _split_paths(data)
    for i, path in enumerate(shards):
        where = path if len(shards) == 1 else f"{path} (shard {i + 1} of {len(shards)})"
        if not os.path.isdir(path):
            return (
                f"data directory {where} does not exist: give the databin that "
                "fairseq-preprocess wrote (e.g. bash prepare-wmt16ende.sh, or "
                "python scripts/prepare_demo.py for the demo corpus)"
            )
    first = shards[0]
    have = sorted(
        f[5:-4] for f in os.listdir(first) if f.startswith("dict.") and f.endswith(".txt")
    )
    for flag, dest in (("--source-lang", "source_lang"), ("--target-lang", "target_lang")):
        lang = getattr(args, dest, None)
        if lang is not None and lang not in have:
            return (
                f"{flag} {lang}: {first} has no dict.{lang}.txt; its languages are "
                f"{', '.join(have) or 'none (no dict.*.txt)'}"
            )


def _upcycle_source(args, run):
    """(args) --upcycle-from names a readable checkpoint of a dense model (read with
    ``mmap``: its tensors are not loaded; the run reads it again when training starts)."""
    path = getattr(args, "upcycle_from", None)
    if path is None:
        return None
    dense = "give a dense checkpoint (e.g. checkpoint_best.pt of a run without --deepspeed_moe)"
    if not os.path.isfile(path):
        return f"--upcycle-from {path}: no such file; {dense}"
    from .checkpoint import format as fmt
    from .checkpoint import io, upcycle

    try:
        state = io.read_checkpoint(path, mmap=True)
    except fmt.UnsafeCheckpointError as e:
        return f"--upcycle-from: {e}"
    except PluginError as e:  # the reader's one line names the file and what is wrong
        return f"--upcycle-from: {e}; {dense}"
    if not upcycle.is_dense_state(state["model"]):
        return f"--upcycle-from {path}: this checkpoint already has MoE layers; {dense}"


def _restore_file(args, run):
    """(task) --restore-file names a file: fairseq looks only as given and, finding
    nothing, trains from update 0 over the save dir's checkpoints. The
    translation_deepspeed task also looks in --save-dir (its trainer load reads the one
    there: ``checkpoint.fairseq_hooks``); other tasks do not."""
    given, save_dir = getattr(args, "restore_file", None), getattr(args, "save_dir", None)
    if given in (None, "checkpoint_last.pt") or save_dir is None:
        return None  # fairseq's default: no checkpoint_last.pt in --save-dir = a fresh start
    from .checkpoint import io

    ours = run.task == "translation_deepspeed"
    suffix = getattr(args, "checkpoint_suffix", None) or ""
    if io.restore_path(given, save_dir if ours else None, suffix):
        return None
    where = f"neither as given nor in --save-dir {save_dir}" if ours else "(read as given)"
    return (
        f"--restore-file {given}: no such file, {where} (fairseq would train from update 0 "
        "and overwrite its checkpoints); "
        + (io.restore_advice(save_dir) or "give the full path of a checkpoint")
    )


def _checkpoint_paths(args, run):
    """(args) every checkpoint of generation's --path (an ensemble: a.pt:b.pt) exists."""
    value = getattr(args, "path", None)
    if not value:
        return None
    if "://" in value or (getattr(args, "checkpoint_shard_count", 1) or 1) > 1:
        return None  # fairseq's PathManager, or -shard<i>/_part<i> files: fairseq checks
    from .checkpoint import io

    paths = _split_paths(value)
    suffix = getattr(args, "checkpoint_suffix", None) or ""
    for i, path in enumerate(paths):
        if os.path.isfile(io.suffixed(path, suffix)):
            continue
        where = f" (checkpoint {i + 1} of {len(paths)})" if len(paths) > 1 else ""
        folder = os.path.dirname(path) or "."
        there = sorted(
            f for f in (os.listdir(folder) if os.path.isdir(folder) else ()) if f.endswith(".pt")
        )
        there = [f for f in there if not f.startswith("experts.")][:8]
        return f"--path: {path} does not exist{where}; " + (
            f"{folder} has {', '.join(there)}" if there else f"{folder} has no checkpoint"
        )


def _ensemble_processes(args, run):
    """(world) lockstep decoding keeps the ranks of one expert-parallel model in step,
    not those of an ensemble's models."""
    value = getattr(args, "path", None)
    paths = _split_paths(value) if value else []
    if run.world <= 1 or len(paths) < 2:
        return None
    from .checkpoint import format as fmt
    from .checkpoint import io

    for path in paths:
        try:
            state = io.read_checkpoint(path, mmap=True)
        except (FileNotFoundError, PluginError):
            continue  # named by _checkpoint_paths, or when fairseq loads it
        info = (
            (state.get("extra_state") or {}).get(fmt.SHARD_KEY) if isinstance(state, dict) else None
        )
        if info and info.get("ep_size", 1) > 1:
            return (
                f"--path: an ensemble with the expert-parallel checkpoint {path} "
                f"(--ep-world-size {info['ep_size']}) cannot run on {run.world} processes: "
                "beam search keeps the processes of one expert-parallel model in step, not "
                "of several; translate the ensemble in one process (each checkpoint is "
                "consolidated as it loads) or one checkpoint at a time on several processes"
            )


def _batch_size(args, run):
    """(command) fairseq-train asserts, with a traceback, that one of the two is given."""
    if (
        run.command == "train"
        and getattr(args, "max_tokens", None) is None
        and getattr(args, "batch_size", None) is None
    ):
        return (
            "give --max-tokens N or --batch-size N (or both): fairseq-train needs a batch "
            "size, e.g. --max-tokens 4096"
        )


def _criterion(args, run):
    """(task) --loss-weights, --base-criterion and --base-criterion-config of model_and_base."""
    if getattr(args, "criterion", None) != "model_and_base" or not hasattr(args, "loss_weights"):
        return None
    from . import losses
    from .criterions.model_and_base import resolve_base_criterion

    weights = losses.parse_loss_weights(args.loss_weights)
    resolve_base_criterion(args.base_criterion, args.base_criterion_config)
    losses.check_loss_names(weights, losses.produced_by(args))


def _processes(args, run):
    """(world) the expert-parallel size divides the processes."""
    opts = _moe(args)
    if opts is not None and run.world % opts.ep_size:
        return (
            f"--ep-world-size {opts.ep_size} must divide the number of processes "
            f"({run.world}); use --ep-world-size {run.world} (expert parallel across all "
            f"processes) or a divisor of it"
        )


def _legacy_ddp(args, run):
    """(args) rank-local experts must not be averaged by fairseq's DDP wrapper."""
    opts = _moe(args)
    backend = getattr(args, "ddp_backend", "legacy_ddp")
    wrapped = getattr(args, "distributed_world_size", 1) > 1  # fairseq wraps the model in DDP
    # no_c10d: fairseq's other name for legacy_ddp (models/distributed_fairseq_model.py)
    legacy = backend in ("legacy_ddp", "no_c10d")
    if opts is not None and opts.ep_size > 1 and wrapped and not legacy:
        return (
            f"--ep-world-size {opts.ep_size} needs --ddp-backend legacy_ddp (got "
            f"{backend}): other backends would average the rank-local experts "
            f"over all processes"
        )


def _layerdrop_in_step(args, run):
    """(args) LayerDrop draws the layers to skip on each process: with expert parallelism,
    a process would wait in an MoE layer's all-to-all for one that skipped the layer."""
    opts = _moe(args)
    if opts is None or opts.ep_size == 1:
        return None
    for side, flag in (("enc", "--encoder-layerdrop"), ("dec", "--decoder-layerdrop")):
        p = getattr(args, flag[2:].replace("-", "_"), 0) or 0
        if side in opts.sides and p > 0:
            return (
                f"{flag} {p:g} does not work with --ep-world-size {opts.ep_size}: each "
                "process draws the layers it skips, so one would wait in an MoE layer's "
                f"all-to-all for a process that skipped it; drop {flag} (LayerDrop works "
                "with --ep-world-size 1)"
            )


def _half_keeps_experts_apart(args, run):
    """(args) fairseq's FP16Optimizer keeps one flat fp32 copy of all parameters."""
    opts = _moe(args)
    half = getattr(args, "fp16", False) or getattr(args, "bf16", False)
    mem_eff = getattr(args, "memory_efficient_fp16", False) or getattr(
        args, "memory_efficient_bf16", False
    )
    if opts is not None and opts.ep_size > 1 and half and not mem_eff:
        return (
            f"--ep-world-size {opts.ep_size} with --fp16/--bf16 needs "
            "--memory-efficient-fp16 / --memory-efficient-bf16: fairseq's "
            "FP16Optimizer keeps one flat fp32 copy of all parameters, so "
            "each rank's experts could not be saved and restored on their own"
        )


def _task_keeps_ranks_in_step(args, run):
    """(task) only translation_deepspeed sets up expert groups and lockstep decoding."""
    opts = _moe(args)
    if opts is not None and opts.ep_size > 1 and run.task != "translation_deepspeed":
        return (
            f"a model with --ep-world-size {opts.ep_size} needs --task translation_deepspeed "
            f"(got {run.task}): it creates DeepSpeed's expert groups and keeps "
            "the ranks in step; add --task translation_deepspeed (user/train.py and "
            "user/generate.py use it by default)"
        )


def _moe_flags(args, run):
    """(args) the MoE flag table's own checks and :data:`RULES_ON_OPTIONS`."""
    _moe(args)


def _moe(args) -> Optional[MoEOptions]:
    """The MoE options of ``args`` when it configures an MoE model, else None."""
    if not getattr(args, "deepspeed_moe", None) or not hasattr(args, "num_experts"):
        return None
    opts = options_from_args(args)
    return opts if opts.sides else None


@dataclass(frozen=True)
class Rule:
    """One check of :data:`RULES`: runs when everything in ``needs`` is known.

    ``model`` rules concern the model the flags describe, and also run when fairseq builds
    a model from a checkpoint's saved flags (generation, hub); the others concern the run
    the flags start (its data, devices, criterion), so a checkpoint's saved flags are not
    held to them.
    """

    check: Callable[[Any, Run], Optional[str]]
    needs: Tuple[str, ...]
    model: bool = False


#: Checks beyond single MoE flags, in the order they run.
RULES: Tuple[Rule, ...] = (
    Rule(_moe_arch, ("argv",)),
    Rule(_half_needs_gpu, ("args", "cuda")),
    Rule(_batch_size, ("args", "command")),
    Rule(_data_directory, ("args", "task")),
    Rule(_checkpoint_paths, ("args",)),
    Rule(_ensemble_processes, ("args", "world")),
    Rule(_restore_file, ("args", "task")),
    Rule(_upcycle_source, ("args",)),
    Rule(_moe_flags, ("args",), model=True),
    Rule(_criterion, ("args",)),
    Rule(_task_keeps_ranks_in_step, ("args", "task"), model=True),
    Rule(_processes, ("args", "world"), model=True),
    Rule(_legacy_ddp, ("args",)),
    Rule(_layerdrop_in_step, ("args",)),
    Rule(_half_keeps_experts_apart, ("args",)),
)


def _run(rules, first, second) -> None:
    for rule in rules:
        problem = rule(first, second)
        if problem:
            raise MoEArgumentError(problem)


def validate(args=None, model_only: bool = False, **known) -> None:
    """Run every rule of :data:`RULES` whose inputs are known.

    Args:
        args: parsed flags (a Namespace or fairseq config); ``None`` before parsing.
        model_only (bool): only the rules about the model (``args`` are a checkpoint's).
        **known: what :class:`Run` fields are known (``argv``, ``cuda``, ``world``, ``task``,
            ``command``).

    Raises:
        MoEArgumentError: the first failed check, naming the flag and the fix.
    """
    run = Run(**known)
    have = {k for k, v in known.items() if v is not None} | (
        {"args"} if args is not None else set()
    )
    rules = [r for r in RULES if set(r.needs) <= have and (r.model or not model_only)]
    _run([r.check for r in rules], args, run)
