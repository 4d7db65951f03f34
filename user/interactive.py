#!/usr/bin/env python
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-interactive`` with this plugin loaded and its flags checked first (see
:mod:`user.entry`); ``bash run.sh translate`` runs it.

Usage: ``python user/interactive.py DATABIN --path CHECKPOINT [options] < text``
"""

import os
import sys


def main():
    # the plugin (user/__init__.py) first, before fairseq and DeepSpeed, as user/generate.py
    from user.entry import run

    run("interactive")


if __name__ == "__main__":
    # run as a script, Python puts user/ first on sys.path: import the package instead
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(here)] + [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]
    main()
