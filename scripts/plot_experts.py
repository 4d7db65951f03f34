#!/usr/bin/env python3
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Heatmap of expert load per MoE layer over training, from TensorBoard logs.

    python scripts/plot_experts.py OUT_DIR/tb/ARCH-RUN -o experts.png [--split train_inner]

Reads the ``moe_<layer>_e<i>`` scalars (fraction of the layer's tokens routed
to expert ``i``) that the ``translation_deepspeed`` task logs, and draws one
panel per MoE layer: updates across, experts down, colour = fraction of
tokens (1/E is balanced). Each panel's title gives the layer's last
dropped-token fraction and gate entropy when they were logged.
"""

import argparse
import os
import re
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

_LOAD = re.compile(r"^moe_(?P<layer>[a-z]+\d+)_e(?P<expert>\d+)$")


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_matrices(scalars) -> Dict[str, Tuple[List[int], List[List[float]]]]:
    """Per layer: (steps, rows of per-expert fractions, one row per expert)."""
    per_layer = defaultdict(dict)
    for tag, points in scalars.items():
        m = _LOAD.match(tag)
        if m:
            per_layer[m.group("layer")][int(m.group("expert"))] = dict(points)
    out = {}
    for layer, experts in sorted(per_layer.items()):
        steps = sorted(set().union(*(set(p) for p in experts.values())))
        rows = [[experts[e].get(s, float("nan")) for s in steps] for e in sorted(experts)]
        out[layer] = (steps, rows)
    return out


def plot(logdir: str, out: str, split: str = "train_inner") -> int:
    """Write the heatmap PNG; returns the number of layers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = os.path.join(logdir, split) if os.path.isdir(os.path.join(logdir, split)) else logdir
    scalars = read_scalars(path)
    layers = load_matrices(scalars)
    if not layers:
        raise SystemExit(
            f"no moe_<layer>_e<i> scalars in {path}: was it trained with "
            "--task translation_deepspeed, MoE layers and --tensorboard-logdir?"
        )
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 1.1 * len(layers)), squeeze=False)
    for ax, (layer, (steps, rows)) in zip(axes[:, 0], layers.items()):
        data = np.array(rows)
        n = data.shape[0]
        im = ax.imshow(
            data,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0,
            vmax=max(2.0 / n, float(np.nanmax(data))),
            extent=(steps[0], steps[-1], n - 0.5, -0.5),
        )
        title = f"{layer}: tokens per expert (balanced = {1 / n:.3f})"
        extra = []
        for key, label in ((f"moe_{layer}_drop", "dropped"), (f"moe_{layer}_ent", "entropy")):
            if scalars.get(key):
                extra.append(f"{label} {scalars[key][-1][1]:.3f}")
        ax.set_title(title + (" | last " + ", ".join(extra) if extra else ""), fontsize=9)
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("updates")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(layers)


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
