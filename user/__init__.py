# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""fairseq user directory: DeepSpeed Mixture-of-Experts Transformers for translation.

Use with ``fairseq-train --user-dir user`` (or ``python user/train.py``). Registers
the ``translation_deepspeed`` task, the ``transformer_ds_moe`` model with its
``transformer_ds_moe_*`` architectures and the ``model_and_base`` criterion.
"""

from . import patches

# First, before anything imports DeepSpeed: the patches every run of the plugin needs
# (user/patches.py lists them all); each guard checks the installed versions.
patches.install(patches.ALWAYS)
patches.check_all()

from .criterions import model_and_base  # noqa: E402, F401
from .models import transformer_ds_moe  # noqa: E402, F401
from .tasks import translation_deepspeed  # noqa: E402, F401
