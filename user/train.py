#!/usr/bin/env python
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-train`` with this plugin loaded and its flags checked first (see :mod:`user.entry`).

Usage: ``python user/train.py DATABIN --arch transformer_ds_moe_... [fairseq-train options]``
"""

import logging
import os
import sys


def main():
    # as fairseq_cli/train.py does before it imports fairseq: the first logging setup wins
    # (fairseq's own import sets the root logger to DEBUG, in Python's format, on stderr)
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
    )
    # then the plugin (user/__init__.py), before fairseq and DeepSpeed: its first patches
    # pick DeepSpeed's accelerator and silence the noise of user/noise.py their imports print
    from user.entry import run

    run("train")


if __name__ == "__main__":
    # run as a script, Python puts user/ first on sys.path: import the package instead
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(here)] + [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]
    main()
