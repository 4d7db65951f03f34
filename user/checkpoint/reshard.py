# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Convert an MoE checkpoint between expert-parallel sizes.

    python -m user.reshard IN.pt OUT.pt --ep-size 1   # one consolidated file
    python -m user.reshard IN.pt OUT.pt --ep-size 4   # shared file + 4 expert shards

``IN.pt`` is any checkpoint this plugin wrote: a shared file with its
``experts.<token>.<r>-of-<E>.pt`` shards beside it, or a consolidated file.
``OUT.pt`` keeps everything (weights, optimizer state re-indexed per
parameter, learning-rate scheduler, data iterator position), so training
resumes from it with ``--restore-file OUT.pt`` (or as ``checkpoint_last.pt``
in the new ``--save-dir``) on ``E`` processes with ``--ep-world-size E``.
A consolidated file needs no shards: one process can generate from it,
continue training, or load it through the hub interface.

Training and generation also convert on the fly when the running
``--ep-world-size`` differs from the checkpoint's; this tool writes the
conversion once.
"""

import argparse
import os
import secrets

from ..errors import refuse
from . import format as fmt
from . import io


def reshard(src: str, dst: str, ep_size: int) -> list:
    """Write ``src`` (any layout) as ``dst`` with ``ep_size`` expert-parallel ranks.

    Args:
        src (str): a checkpoint (shared file with shards, or consolidated).
        dst (str): output path of the shared (or consolidated) file; shards
            go next to it.
        ep_size (int): target expert-parallel size; 1 = consolidated.

    Returns:
        the paths written, shards first.
    """
    full = io.load_consolidated(src)
    if fmt.count_experts(full["model"]) == 0:
        raise fmt.ExpertCheckpointError(
            f"{src} has no experts (a dense checkpoint): nothing to reshard"
        )
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if ep_size == 1:
        io.atomic_save(full, dst)
        return [dst]
    names = fmt.consolidated_param_names(full)
    token = f"u{fmt.num_updates(full)}-{secrets.token_hex(4)}"
    shared, shards = fmt.scatter(full, ep_size, token, names)
    written = []
    for r, shard in enumerate(shards):
        path = io.shard_file(os.path.dirname(os.path.abspath(dst)), token, r, ep_size)
        io.atomic_save(shard, path)
        written.append(path)
    io.atomic_save(shared, dst)  # last: it names shards that now exist
    return written + [dst]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m user.reshard", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("src", help="checkpoint to convert (its expert shards beside it)")
    parser.add_argument("dst", help="output checkpoint (shards are written beside it)")
    parser.add_argument(
        "--ep-size",
        type=int,
        required=True,
        help="target --ep-world-size; 1 writes one consolidated file",
    )
    args = parser.parse_args(argv)

    if args.ep_size < 1:
        refuse(parser.prog, f"--ep-size {args.ep_size}: must be at least 1")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        refuse(
            parser.prog, "dst must differ from src (the source is read while the output is written)"
        )
    if os.path.isdir(args.dst):
        refuse(
            parser.prog,
            f"dst {args.dst} is a directory: give the output file, e.g. "
            f"{os.path.join(args.dst, 'checkpoint_last.pt')}",
        )
    try:
        written = reshard(args.src, args.dst, args.ep_size)
    except (fmt.ExpertCheckpointError, OSError) as e:  # a bad file; the disk refused
        refuse(parser.prog, e)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
