# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""fairseq user directory: DeepSpeed Mixture-of-Experts Transformers for translation.

Use with ``fairseq-train --user-dir user`` (or ``python user/train.py``). Registers
the ``translation_deepspeed`` task, the ``transformer_ds_moe`` model with its
``transformer_ds_moe_*`` architectures and the ``model_and_base`` criterion.
"""

from . import checkpoint_compat, clean_exit, entry, expert_checkpoint
from . import ds_moe  # noqa: F401  picks DeepSpeed's accelerator before anything imports it
from .criterions import model_and_base  # noqa: F401
from .models import transformer_ds_moe  # noqa: F401
from .tasks import translation_deepspeed  # noqa: F401

checkpoint_compat.install()
clean_exit.install()
ds_moe.install_grad_clip()
expert_checkpoint.install()
entry.install_error_hook()
