# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Upstream messages a user cannot act on, silenced: the one list (:data:`NOISE`).

Each entry names one message, what prints it and why nothing a user does changes it
(the versions are pinned, the call is fairseq's). A warning is matched by its category,
its message and, where its place is stable, the module it is attributed to; a log line
by its logger, level and message. Nothing else is filtered: the plugin's own warnings
(an old flag spelling, a large gate-loss weight) and any other warning still show.

The filters go after those a user gives (``-W``, ``PYTHONWARNINGS``), which win. They
are installed by the first patch of :data:`user.patches.PATCHES`, when the plugin is
imported: ``user/train.py`` and ``user/generate.py`` import it before fairseq, so what
fairseq and DeepSpeed print at import is covered too. ``fairseq-train --user-dir user``
imports fairseq and DeepSpeed before the plugin, which cannot silence what they print
then (docs/troubleshooting.md#noise-you-can-ignore). DeepSpeed's "Setting accelerator to
CPU" is not filtered: the plugin picks the CPU accelerator before DeepSpeed is imported
(the ``deepspeed_cpu_accelerator`` patch), so DeepSpeed has nothing to say.

Imports only the standard library.
"""

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Type


@dataclass(frozen=True)
class Noise:
    """One silenced message: a warning (``category``) or a log line (``logger``).

    Args:
        message (str): a regular expression matching the start of the message.
        reason (str): what prints it and why a user cannot act on it.
        category (type, optional): the warning's class.
        module (str, optional): the module a warning is attributed to (None: any; for
            messages whose stack level points at the caller, which varies).
        logger (str, optional): the logger of a log line.
        level (int): the log line's level.
    """

    message: str
    reason: str
    category: Optional[Type[Warning]] = None
    module: Optional[str] = None
    logger: Optional[str] = None
    level: int = logging.INFO


_HYDRA = (
    "fairseq builds its configuration with hydra's 1.0 API (convert_namespace_to_omegaconf); "
    "hydra-core 1.3.2 is what fairseq-fixed runs with on Python 3.11"
)

# fmt: off
#: The list.
NOISE: Tuple[Noise, ...] = (
    Noise(r"Please install tensorboardX", logger="fairseq.tasks.text_to_speech",
          reason="fairseq imports every task, the unused speech tasks too, and this one looks "
                 "for tensorboardX; TensorBoard logging goes through torch.utils.tensorboard "
                 "(installed)"),
    Noise(r"hydra\.experimental\.initialize\(\) is no longer experimental", reason=_HYDRA,
          category=UserWarning, module="hydra.experimental.initialize"),
    Noise(r"\s*The version_base parameter is not specified", reason=_HYDRA,
          category=UserWarning, module="hydra.experimental.initialize"),
    Noise(r"hydra\.experimental\.compose\(\) is no longer experimental", reason=_HYDRA,
          category=UserWarning, module="hydra.experimental.compose"),
    Noise(r"\s*The strict flag in the compose API is deprecated", reason=_HYDRA,
          category=UserWarning, module="hydra.compose"),
    Noise(r"In 'config': Usage of deprecated keyword in package header", category=UserWarning,
          module="hydra.core.default_element",
          reason="fairseq's config files have hydra 1.0's package header"),
    Noise(r"\s*'config' is validated against ConfigStore schema", category=UserWarning,
          reason="fairseq's config file and its config schema share the name 'config' (hydra "
                 "1.0's schema matching); attributed to whoever called fairseq's parser"),
    Noise(r"Setting JobRuntime:name=", logger="hydra.core.utils", level=logging.DEBUG,
          reason="fairseq's wav2vec2_classification sets the root logger to DEBUG when fairseq "
                 "is imported, before fairseq-generate configures logging; hydra's DEBUG lines "
                 "then reach generate's log"),
    Noise(r"If you are using BPE on the target side, the BLEU score is computed on BPE tokens",
          logger="fairseq_cli.generate", level=logging.WARNING,
          reason="fairseq-generate says this of its own BLEU line, printed with any --bpe; "
                 "the score to report is scripts/sacrebleu.sh's (detokenized, with its "
                 "signature), which run.sh and make demo print"),
    Noise(r"'pin_memory' argument is set as true but no accelerator is found",
          category=UserWarning, module="torch.utils.data.dataloader",
          reason="fairseq's batch iterator always asks for pinned memory, which only a GPU "
                 "uses; nothing changes on the CPU"),
    Noise(r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", category=FutureWarning,
          module="fairseq.tasks.fairseq_task",
          reason="fairseq's train_step uses torch.cuda.amp.autocast (deprecated in torch 2.4), "
                 "which still works"),
    Noise(r"Support for mismatched key_padding_mask and attn_mask is deprecated",
          category=UserWarning, module="torch.nn.functional",
          reason="fairseq's MultiheadAttention passes a boolean padding mask with a float "
                 "attention mask; torch converts it"),
)
# fmt: on


class _Silence(logging.Filter):
    """Drops the log lines of one :class:`Noise` (attached to its logger)."""

    def __init__(self, noise: Noise):
        super().__init__()
        self.noise = noise
        self.pattern = re.compile(noise.message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == self.noise.level and self.pattern.match(record.getMessage()))


def silence() -> None:
    """Install a filter for each entry of :data:`NOISE` (idempotent)."""
    for n in NOISE:
        if n.logger is not None:
            logger = logging.getLogger(n.logger)
            if not any(isinstance(f, _Silence) and f.noise == n for f in logger.filters):
                logger.addFilter(_Silence(n))
        else:
            module = re.escape(n.module) + r"\Z" if n.module is not None else ""
            # appended: a filter the user gave (-W, PYTHONWARNINGS) comes first and wins;
            # an identical filter is not added twice
            warnings.filterwarnings("ignore", n.message, n.category, module, append=True)
