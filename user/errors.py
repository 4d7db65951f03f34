# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The base of the plugin's own errors, and the environment switches (imports only the
standard library, so the error hook can recognise them even while the plugin itself
fails to import)."""

import os
import sys
import traceback
from typing import NoReturn

#: Set to 1 to print the traceback behind a one-line error too (for a bug report).
DEBUG = "FAIRSEQ_MOE_DEBUG"


class PluginError(Exception):
    """An error whose message names the flag or file and the fix: printed as one line."""


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: unset or empty is ``default``; ``0``, ``false``,
    ``no`` and ``off`` are off, anything else on."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def report(prog: str, error) -> None:
    """Print the one line ``prog: error: ...``; with ``FAIRSEQ_MOE_DEBUG=1`` an exception's
    traceback comes first."""
    if env_flag(DEBUG, False) and isinstance(error, BaseException):
        traceback.print_exception(error)
    print(f"{prog}: error: {error}", file=sys.stderr)


def refuse(prog: str, error) -> NoReturn:
    """Stop a command with one line (:func:`report`, no usage dump), exit status 2 as
    argparse's."""
    report(prog, error)
    sys.exit(2)
