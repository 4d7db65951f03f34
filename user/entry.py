# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""What ``user/train.py`` and ``user/generate.py`` share: add ``--user-dir``,
check the plugin's flags before any work, then hand over to fairseq's CLI."""

import contextlib
import copy
import io
import os
import re
import sys
from typing import List, Optional

USER_DIR = os.path.dirname(os.path.abspath(__file__))


def with_user_dir(argv: List[str]) -> List[str]:
    """``argv`` plus ``--user-dir <this plugin>`` unless one is given."""
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return list(argv)
    return [*argv, "--user-dir", USER_DIR]


def _given(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def with_task(argv: List[str]) -> List[str]:
    """``argv`` plus ``--task translation_deepspeed`` unless a task is given.

    fairseq's default task is ``translation``, which neither sets up DeepSpeed's
    expert groups nor keeps expert-parallel ranks in lockstep: an expert-parallel
    model would fail inside its first all-to-all.
    """
    if _given(argv, "--task"):
        return list(argv)
    return [*argv, "--task", "translation_deepspeed"]


def launcher_args(argv: List[str], env, cuda: bool) -> List[str]:
    """fairseq flags for a process started by torchrun (or any launcher that sets
    ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT``), unless given.

    fairseq needs them spelled out on CPU: its own inference divides by the
    GPU count. Without those variables nothing is added (single process, or
    fairseq's own spawn / SLURM inference).

    Args:
        argv: the command line so far.
        env: the environment (``os.environ``).
        cuda (bool): whether GPUs are used (else gloo).
    """
    if not all(k in env for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")):
        return []
    if int(env["WORLD_SIZE"]) < 2 or _given(argv, "--distributed-init-method"):
        return []
    wanted = [
        ("--distributed-init-method", "env://"),
        ("--distributed-no-spawn", None),
        ("--distributed-world-size", env["WORLD_SIZE"]),
        ("--distributed-rank", env["RANK"]),
    ]
    if cuda:
        wanted.append(("--device-id", env.get("LOCAL_RANK", "0")))
    else:
        wanted.append(("--distributed-backend", "gloo"))
    if any(a.startswith("--ep-world-size") for a in argv):
        # expert parameters are rank-local: only legacy_ddp leaves them alone
        wanted.append(("--ddp-backend", "legacy_ddp"))
    extra = []
    for flag, value in wanted:
        if not _given(argv, flag):
            extra += [flag] if value is None else [flag, value]
    return extra


_SENTENCE_LINE = re.compile(r"^[STHDPAEI]-(\d+)\t")


def merge_generate_outputs(texts: List[str]) -> str:
    """One ``fairseq-generate`` output from the outputs of several ranks.

    Each rank translated its own shard; the per-sentence lines (``S-``, ``T-``,
    ``H-``, ``D-``, ``P-``, ...) are put back in sentence-id order, each
    sentence's lines in their original order. Rank 0's other lines follow,
    except its corpus-BLEU line, which covered its shard only.

    Args:
        texts: each rank's output, rank 0 first.
    """
    by_id = {}
    for text in texts:
        for line in text.splitlines():
            m = _SENTENCE_LINE.match(line)
            if m:
                by_id.setdefault(int(m.group(1)), []).append(line)
    rest = [ln for ln in texts[0].splitlines() if not _SENTENCE_LINE.match(ln)]
    out = [ln for i in sorted(by_id) for ln in by_id[i]]
    out += [ln for ln in rest if not ln.startswith("Generate ")]
    out.append(f"# {len(by_id)} sentences from {len(texts)} processes; score them with "
               "scripts/sacrebleu.sh (per-process BLEU lines omitted)")
    return "\n".join(out) + "\n"


def _gathering(main):
    """``main`` whose printed output, on several processes, is gathered on rank 0."""

    def gathered_main(cfg, **kwargs):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return main(cfg, **kwargs)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = main(cfg, **kwargs)
        texts = [None] * dist.get_world_size()
        dist.all_gather_object(texts, buf.getvalue())
        if dist.get_rank() == 0:
            sys.stdout.write(merge_generate_outputs(texts))
            sys.stdout.flush()
        return result

    return gathered_main


def _value(argv: List[str], flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_argv(argv: List[str], cuda: bool) -> None:
    """Checks on the raw command line, before fairseq parses it.

    Raises:
        MoEArgumentError: naming the flag and the fix.
    """
    from .moe_options import MoEArgumentError

    arch = _value(argv, "--arch") or _value(argv, "-a")
    if _given(argv, "--deepspeed_moe") and arch and not arch.startswith("transformer_ds_moe"):
        raise MoEArgumentError(
            f"--deepspeed_moe needs a transformer_ds_moe_* architecture, not --arch {arch}: "
            f"use --arch transformer_ds_moe{arch[len('transformer'):] if arch.startswith('transformer') else ''}"
        )
    half = [f for f in ("--fp16", "--memory-efficient-fp16") if _given(argv, f)]
    if half and (not cuda or _given(argv, "--cpu")):
        raise MoEArgumentError(
            f"{half[0]} needs a CUDA GPU (fairseq's fp16 training does not run on the CPU): "
            "drop it to train in fp32 on the CPU"
        )


def check_args(args) -> None:
    """Check the MoE and ``model_and_base`` flags on parsed ``args``.

    Raises:
        MoEArgumentError: naming the flag and the fix.
    """
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    from .criterions.model_and_base import resolve_base_criterion
    from .losses import check_loss_names, parse_loss_weights
    from .models.transformer_ds_moe import GATE_LOSS, TransformerDSMoEModel
    from .moe_options import options_from_args

    produced = []
    arch = getattr(args, "arch", None)
    if arch in ARCH_MODEL_REGISTRY and ARCH_MODEL_REGISTRY[arch] is TransformerDSMoEModel:
        filled = copy.copy(args)
        ARCH_CONFIG_REGISTRY[arch](filled)
        if options_from_args(filled).sides:
            produced.append(GATE_LOSS)
    data = getattr(args, "data", None)
    if getattr(args, "task", None) == "translation_deepspeed" and data:
        first = data.split(":")[0]
        if not os.path.isdir(first):
            from .moe_options import MoEArgumentError

            raise MoEArgumentError(
                f"data directory {first} does not exist: give the databin that "
                "fairseq-preprocess wrote (e.g. bash prepare-wmt16ende.sh, or "
                "python scripts/prepare_demo.py for the demo corpus)"
            )
        have = sorted(f[5:-4] for f in os.listdir(first) if f.startswith("dict.") and f.endswith(".txt"))
        for flag, lang in (("--source-lang", args.source_lang), ("--target-lang", args.target_lang)):
            if lang is not None and lang not in have:
                from .moe_options import MoEArgumentError

                raise MoEArgumentError(
                    f"{flag} {lang}: {first} has no dict.{lang}.txt; its languages are "
                    f"{', '.join(have) or 'none (no dict.*.txt)'}"
                )
    upcycle = getattr(args, "upcycle_from", None)
    if upcycle is not None and not os.path.isfile(upcycle):
        from .moe_options import MoEArgumentError

        raise MoEArgumentError(
            f"--upcycle-from {upcycle}: no such file; give a dense checkpoint "
            "(e.g. checkpoint_best.pt of a run without --deepspeed_moe)"
        )
    if getattr(args, "criterion", None) == "model_and_base":
        weights = parse_loss_weights(args.loss_weights)
        resolve_base_criterion(args.base_criterion, args.base_criterion_config)
        check_loss_names(weights, produced)


def run(cli: str, argv: Optional[List[str]] = None) -> None:
    """Run fairseq's ``train``/``generate``/``interactive`` CLI with the plugin.

    Args:
        cli (str): ``"train"``, ``"generate"`` or ``"interactive"``.
        argv: arguments (default ``sys.argv[1:]``).
    """
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from .moe_options import MoEArgumentError

    import torch

    argv = with_task(with_user_dir(sys.argv[1:] if argv is None else argv))
    argv += launcher_args(argv, os.environ, torch.cuda.is_available())
    try:
        check_argv(argv, torch.cuda.is_available())
    except MoEArgumentError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cli == "train":
        import fairseq_cli.train as fairseq_cli_module

        parser = options.get_training_parser()
    elif cli == "generate":
        import fairseq_cli.generate as fairseq_cli_module

        from .tasks import translation_deepspeed

        translation_deepspeed.GENERATING = True

        parser = options.get_generation_parser()
    else:
        import fairseq_cli.interactive as fairseq_cli_module

        parser = options.get_interactive_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    try:
        check_args(args)
    except MoEArgumentError as e:
        parser.error(str(e))
    cfg = convert_namespace_to_omegaconf(args)
    main = fairseq_cli_module.main
    if cli == "generate":
        main = _gathering(main)
    distributed_utils.call_main(cfg, main)


def install_error_hook() -> None:
    """Print our flag errors as one line (``fairseq-train: error: ...``), no traceback.

    For ``fairseq-train --user-dir user``, where the checks above run inside
    fairseq (still before training starts). Other exceptions are untouched.
    """
    from .expert_checkpoint import ExpertCheckpointError
    from .moe_options import MoEArgumentError
    from .upcycle import UpcycleError

    ours = (MoEArgumentError, ExpertCheckpointError, UpcycleError)
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ours):
            print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    if not getattr(sys.excepthook, "_moe_plugin", False):
        hook._moe_plugin = True
        sys.excepthook = hook
