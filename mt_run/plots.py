# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The pictures of a training run: validation against updates, expert load per MoE layer.

Both draw from *series*, ``{scalar: [(update, value), ...]}``, read from a fairseq log
(:func:`log_series`: the records ``mt_run.fairseq_log`` reads; json logs hold every
scalar) or from TensorBoard (``scripts/plot_experts.py``). The expert scalars are those
the ``translation_deepspeed`` task logs: ``moe_<layer>_e<i>`` (the share of the layer's
token-expert assignments routed to expert ``i``) and ``moe_<layer>_drop`` (the share
dropped for lack of capacity).
"""

import re
from collections import defaultdict

_LOAD = re.compile(r"^moe_(?P<layer>[a-z]+\d+)_e(?P<expert>\d+)$")


def log_series(records):
    """``{scalar: [(update, value), ...]}`` of fairseq log records that carry
    ``num_updates``; a later record for the same update (a rerun) replaces an earlier."""
    by_key = defaultdict(dict)
    for rec in records:
        if "num_updates" not in rec:
            continue
        step = int(rec["num_updates"])
        for key, value in rec.items():
            if isinstance(value, float):
                by_key[key][step] = value
    return {key: sorted(points.items()) for key, points in by_key.items()}


def expert_matrices(series):
    """Per MoE layer: ``(updates, rows)``, one row of shares per expert over ``updates``
    (NaN where an update lacks one)."""
    per_layer = defaultdict(dict)
    for key, points in series.items():
        m = _LOAD.match(key)
        if m:
            per_layer[m.group("layer")][int(m.group("expert"))] = dict(points)
    out = {}
    for layer, experts in sorted(per_layer.items(), key=lambda kv: _layer_order(kv[0])):
        steps = sorted(set().union(*(set(p) for p in experts.values())))
        rows = [[experts[e].get(s, float("nan")) for s in steps] for e in sorted(experts)]
        out[layer] = (steps, rows)
    return out


def _layer_order(layer):
    """``enc1`` before ``dec0``, ``dec2`` before ``dec10``."""
    m = re.match(r"([a-z]+)(\d+)$", layer)
    if not m:
        return (2, 0, layer)
    return (0 if m.group(1) == "enc" else 1, int(m.group(2)), layer)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_experts(series, out, title=None):
    """Write the expert-load heatmap PNG: a panel per MoE layer, updates across, one row
    per expert and a last row of the dropped share, colour = share of the assignments
    (1/E is balanced).

    Returns:
        the number of layers drawn (0: no expert scalars, nothing written).
    """
    import numpy as np

    layers = expert_matrices(series)
    if not layers:
        return 0
    plt = _pyplot()
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 1.0 + 1.25 * len(layers)), squeeze=False)
    for ax, (layer, (steps, rows)) in zip(axes[:, 0], layers.items()):
        n = len(rows)
        drop = dict(series.get(f"moe_{layer}_drop", []))
        labels = [f"e{i}" for i in range(n)]
        if drop:
            rows = rows + [[drop.get(s, float("nan")) for s in steps]]
            labels.append("drop")
        data = np.array(rows)
        # cell edges halfway between logged updates (validations come unevenly spaced)
        x = np.array(steps, dtype=float)
        mid = (x[1:] + x[:-1]) / 2
        first = x[0] - (mid[0] - x[0] if len(x) > 1 else 0.5)
        last = x[-1] + (x[-1] - mid[-1] if len(x) > 1 else 0.5)
        edges = np.concatenate([[first], mid, [last]])
        im = ax.pcolormesh(
            edges,
            np.arange(len(rows) + 1) - 0.5,
            np.ma.masked_invalid(data),
            cmap="viridis",
            vmin=0,
            vmax=max(2.0 / n, float(np.nanmax(data))),
        )
        ax.invert_yaxis()
        if drop:
            ax.axhline(n - 0.5, color="white", linewidth=1.5)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        last = [f"{labels[i]} {data[i, -1]:.2f}" for i in range(n)]
        text = f"{layer}: share of tokens per expert (balanced {1 / n:.2f}); last: " + " ".join(
            last
        )
        if drop:
            text += f", dropped {data[-1, -1]:.3f}"
        ax.set_title(text, fontsize=8, loc="left")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("updates")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(layers)


def draw_validation(series, out, title=None):
    """Write the validation PNG: valid loss (and the training loss, lighter) against
    updates, and valid BLEU on a second axis when it was computed.

    Args:
        series: ``{"valid": valid series, "train": train_inner series}``.

    Returns:
        the number of validations drawn (0: none, nothing written).
    """
    valid, train = series.get("valid", {}), series.get("train", {})
    loss = valid.get("loss", [])
    if not loss:
        return 0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train.get("loss"):
        xs, ys = zip(*train["loss"])
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    xs, ys = zip(*loss)
    ax.plot(xs, ys, "o-", color="tab:blue", markersize=3, label="valid loss")
    ax.set_xlabel("updates")
    ax.set_ylabel("loss (base 2)")
    best = min(ys)
    text = f"best valid loss {best:.3f} at update {xs[ys.index(best)]}"
    handles, labels = ax.get_legend_handles_labels()
    bleu = valid.get("bleu", [])
    if bleu:
        ax2 = ax.twinx()
        bx, by = zip(*bleu)
        ax2.plot(bx, by, "s-", color="tab:orange", markersize=3, label="valid BLEU")
        ax2.set_ylabel("BLEU")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        text += f"; best BLEU {max(by):.2f}"
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title((f"{title}\n" if title else "") + text, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(loss)
