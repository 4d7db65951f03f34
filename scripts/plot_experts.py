#!/usr/bin/env python3
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Heatmap of expert load per MoE layer over training, from TensorBoard logs.

    python scripts/plot_experts.py OUT_DIR/tb/ARCH-RUN -o experts.png [--split train_inner]

Reads the ``moe_<layer>_e<i>`` scalars (fraction of the layer's tokens routed
to expert ``i``) and ``moe_<layer>_drop`` that the ``translation_deepspeed`` task
logs, and draws one panel per MoE layer (``mt_run.plots``, as the main job's
``experts.png``): updates across, experts down and the dropped share last,
colour = fraction of tokens (1/E is balanced).
"""

import argparse
import os
import sys
from typing import Dict, List, Tuple

from mt_run import plots

#: per layer: (updates, one row of shares per expert); mt_run.plots draws from it
load_matrices = plots.expert_matrices


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot(logdir: str, out: str, split: str = "train_inner") -> int:
    """Write the heatmap PNG (``mt_run.plots.draw_experts``); returns the number of
    layers drawn."""
    path = os.path.join(logdir, split) if os.path.isdir(os.path.join(logdir, split)) else logdir
    drawn = plots.draw_experts(read_scalars(path), out, os.path.basename(os.path.normpath(logdir)))
    if not drawn:
        raise SystemExit(
            f"no moe_<layer>_e<i> scalars in {path}: was it trained with "
            "--task translation_deepspeed, MoE layers and --tensorboard-logdir?"
        )
    return drawn


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir", help="a run's TensorBoard directory (--tensorboard-logdir)")
    p.add_argument("-o", "--output", default="experts.png", help="PNG to write [experts.png]")
    p.add_argument(
        "--split",
        default="train_inner",
        help="which log: train_inner (every --log-interval), train or valid",
    )
    args = p.parse_args(argv)
    n = plot(args.logdir, args.output, args.split)
    print(f"{args.output}: {n} MoE layer(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
