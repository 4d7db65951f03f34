# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The base of the plugin's own errors (imports nothing, so the error hook can
recognise them even while the plugin itself fails to import)."""


class PluginError(Exception):
    """An error whose message names the flag or file and the fix: printed as one line."""
