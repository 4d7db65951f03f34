# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""What ``user/train.py`` and ``user/generate.py`` share: add ``--user-dir`` (and
``--task translation_deepspeed``, and the flags a torchrun process needs), check the
plugin's flags before any work, then hand over to fairseq's CLI."""

import contextlib
import importlib
import io
import os
import re
import sys
from typing import List, Optional

from .errors import refuse
from .moe_options import MoEArgumentError, flag_given, validate

USER_DIR = os.path.dirname(os.path.abspath(__file__))


def with_user_dir(argv: List[str]) -> List[str]:
    """``argv`` plus ``--user-dir <this plugin>`` unless one is given."""
    if flag_given(argv, "--user-dir"):
        return list(argv)
    return [*argv, "--user-dir", USER_DIR]


def with_task(argv: List[str]) -> List[str]:
    """``argv`` plus ``--task translation_deepspeed`` unless a task is given.

    fairseq's default task is ``translation``, which neither sets up DeepSpeed's
    expert groups nor keeps expert-parallel ranks in lockstep: an expert-parallel
    model would fail inside its first all-to-all.
    """
    if flag_given(argv, "--task"):
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
    if int(env["WORLD_SIZE"]) < 2 or flag_given(argv, "--distributed-init-method"):
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
        if not flag_given(argv, flag):
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
    out.append(
        f"# {len(by_id)} sentences from {len(texts)} processes; score them with "
        "scripts/sacrebleu.sh (per-process BLEU lines omitted)"
    )
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


def _refuse(error: Exception) -> None:
    """One line naming the flag and the fix (see :func:`user.errors.refuse`)."""
    refuse(os.path.basename(sys.argv[0]), error)


def run(cli: str, argv: Optional[List[str]] = None) -> None:
    """Run fairseq's ``train``/``generate``/``interactive`` CLI with the plugin.

    Args:
        cli (str): ``"train"``, ``"generate"`` or ``"interactive"``.
        argv: arguments (default ``sys.argv[1:]``).
    """
    import torch
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = with_task(with_user_dir(sys.argv[1:] if argv is None else argv))
    argv += launcher_args(argv, os.environ, torch.cuda.is_available())
    try:
        validate(argv=argv)  # what fairseq's parser would reject less clearly
    except MoEArgumentError as e:
        _refuse(e)
    parser = {
        "train": options.get_training_parser,
        "generate": options.get_generation_parser,
        "interactive": options.get_interactive_generation_parser,
    }[cli]()
    args = options.parse_args_and_arch(parser, input_args=argv)
    try:
        validate(
            args,
            cuda=torch.cuda.is_available(),
            world=args.distributed_world_size,
            task=args.task,
            command=cli,
        )
    except MoEArgumentError as e:
        _refuse(e)
    main = importlib.import_module(f"fairseq_cli.{cli}").main
    if cli == "generate":
        main = _gathering(main)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)
