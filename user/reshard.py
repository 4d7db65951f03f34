# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``python -m user.reshard IN.pt OUT.pt --ep-size E``: see :mod:`user.checkpoint.reshard`."""

from .checkpoint.reshard import main

if __name__ == "__main__":
    main()
