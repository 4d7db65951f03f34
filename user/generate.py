#!/usr/bin/env python
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-generate`` with this plugin loaded and its flags checked first.

Usage: ``python user/generate.py DATABIN --path CHECKPOINT [fairseq-generate options]``
"""

import os
import sys


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    # run as a script, Python puts user/ first on sys.path: import the package instead
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    import fairseq_cli.generate  # noqa: F401  first, so logging is set up as fairseq-generate does
    from user.entry import run

    run("generate")


if __name__ == "__main__":
    main()
