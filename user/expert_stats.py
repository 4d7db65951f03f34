# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Watching the experts: routing statistics from the model to fairseq's logs.

After each training or validation forward the model holds, per MoE layer, the tokens
sent to each expert, the tokens dropped for lack of capacity, the router entropy and
the gate loss (decoding collects none). :func:`expert_load_stats` turns them into
summable logging-output entries; :func:`log_routing_metrics` logs, summed over ranks
and micro-batches:

* ``moe_imbalance`` = (tokens of the busiest expert) / (tokens per expert if perfectly
  balanced), averaged over MoE layers: 1.0 is balanced, ``--num-experts`` means every
  token went to one expert;
* ``moe_drop``, ``moe_ent``: the dropped share and the mean router entropy over all MoE
  layers (with ``moe_imbalance`` and the criterion's gate loss, the summary);
* per layer (``enc1``, ``dec0``, ...): each expert's share, the dropped share, the mean
  router entropy, the mean gate loss and, with ``--moe-z-loss``, the mean router z-loss
  (with ``--moe-bias-balance``, the spread of the balancing bias).

fairseq's console progress bars (``--log-format simple``, ``tqdm``) print the summary
only, unless ``--moe-console-metrics all``: see :func:`console_stats`.
"""

import contextvars
import re
from collections import OrderedDict

from fairseq import metrics

#: ``--moe-console-metrics`` of the run (``"summary"`` or ``"all"``). fairseq_cli makes
#: its progress bars without the task, so the task sets this when it builds its MoE model
#: (on the main thread, where fairseq logs) and nothing else writes it; until then the
#: console prints everything, as fairseq does.
CONSOLE_METRICS: contextvars.ContextVar = contextvars.ContextVar(
    "moe_console_metrics", default="all"
)
_PER_LAYER_KEY = re.compile(r"moe_(enc|dec)\d+_")  # moe_<layer_tag(...)>_*


def unwrap_model(model):
    """The fairseq model inside DDP/FSDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_tag(name: str) -> str:
    """Short name of an MoE block: ``encoder.layers.1.moe_ffn`` -> ``enc1``."""
    m = re.search(r"(encoder|decoder)\.layers\.(\d+)\.", name)
    return f"{m.group(1)[:3]}{m.group(2)}" if m else name


def console_stats(stats: dict) -> dict:
    """What a console progress bar prints of ``stats``: all of it with
    ``--moe-console-metrics all``, else all but the per-layer ``moe_<layer>_*`` scalars
    (``--log-format json`` and the TensorBoard, wandb and aim loggers get ``stats``)."""
    if CONSOLE_METRICS.get() == "all":
        return stats
    return OrderedDict((k, v) for k, v in stats.items() if not _PER_LAYER_KEY.match(k))


def expert_load_stats(model) -> dict:
    """Summable routing statistics of the last forward, for fairseq's logging outputs.

    Returns (empty for a dense model), with ``L`` each MoE layer's tag (``enc1``):
        ``_moe_L_n<i>``: tokens sent to expert ``i``; ``_moe_L_drop``: tokens over
        capacity; ``_moe_L_routed``: token-expert assignments; ``_moe_L_tok``: real
        tokens; ``_moe_L_ent``: summed gate entropy; ``_moe_L_aux``, ``_moe_L_calls``:
        gate loss and forwards (for its mean); ``_moe_L_z``: router z-loss (with
        ``--moe-z-loss``); ``_moe_L_bias``: the spread (max - min) of the balancing
        bias (with ``--moe-bias-balance``); ``_moe_load_max``/``_moe_load_tot``:
        sums over layers of (busiest expert's tokens x E) and of routed tokens.
    """
    stats = getattr(unwrap_model(model), "routing_stats", lambda: {})()
    if not stats:
        return {}
    out = {"_moe_load_max": 0.0, "_moe_load_tot": 0.0}
    for name, st in stats.items():
        tag, counts = layer_tag(name), st["counts"]
        out["_moe_load_max"] += float(counts.max()) * counts.numel()
        out["_moe_load_tot"] += float(counts.sum())
        for i, c in enumerate(counts.tolist()):
            out[f"_moe_{tag}_n{i}"] = c
        out[f"_moe_{tag}_drop"] = st["dropped"]
        out[f"_moe_{tag}_routed"] = st["routed"]
        out[f"_moe_{tag}_tok"] = st["tokens"]
        out[f"_moe_{tag}_ent"] = st["entropy"]
        out[f"_moe_{tag}_aux"] = st["aux"]
        for key in ("z", "bias"):  # (with --moe-z-loss, --moe-bias-balance)
            if key in st:
                out[f"_moe_{tag}_{key}"] = st[key]
        out[f"_moe_{tag}_calls"] = 1.0
    return out


def log_routing_metrics(logging_outputs) -> None:
    """``moe_imbalance``; ``moe_drop`` (fraction of token-expert assignments dropped) and
    ``moe_ent`` (mean gate entropy per token, nats), over all MoE layers; and per MoE
    layer ``moe_L_e<i>`` (fraction of tokens routed to expert i), ``moe_L_drop``,
    ``moe_L_ent`` (ln E = uniform), ``moe_L_aux`` (mean gate loss), ``moe_L_z`` (mean
    router z-loss, with ``--moe-z-loss``), ``moe_L_bias`` (the balancing bias's spread,
    with ``--moe-bias-balance``); all summed over
    ranks, micro-batches and (for the first three) layers before dividing."""
    load_tot = sum(log.get("_moe_load_tot", 0) for log in logging_outputs)
    if load_tot > 0:
        load_max = sum(log.get("_moe_load_max", 0) for log in logging_outputs)
        metrics.log_scalar("moe_imbalance", load_max / load_tot, load_tot, round=3)
    keys = sorted(
        {
            k
            for log in logging_outputs
            for k in log
            if k.startswith("_moe_") and k not in ("_moe_load_max", "_moe_load_tot")
        }
    )
    tot = {k: sum(log.get(k, 0) for log in logging_outputs) for k in keys}
    tags = sorted({k[len("_moe_") :].rsplit("_", 1)[0] for k in keys})
    routed, tokens = (sum(tot.get(f"_moe_{t}_{s}", 0) for t in tags) for s in ("routed", "tok"))
    if routed > 0:
        dropped = sum(tot.get(f"_moe_{t}_drop", 0) for t in tags)
        metrics.log_scalar("moe_drop", dropped / routed, routed, round=4)
    if tokens > 0:
        entropy = sum(tot.get(f"_moe_{t}_ent", 0) for t in tags)
        metrics.log_scalar("moe_ent", entropy / tokens, tokens, round=3)
    for tag in tags:
        routed = tot.get(f"_moe_{tag}_routed", 0)
        if routed <= 0:
            continue
        i = 0
        while f"_moe_{tag}_n{i}" in tot:
            metrics.log_scalar(f"moe_{tag}_e{i}", tot[f"_moe_{tag}_n{i}"] / routed, routed, round=3)
            i += 1
        metrics.log_scalar(f"moe_{tag}_drop", tot[f"_moe_{tag}_drop"] / routed, routed, round=4)
        if tot.get(f"_moe_{tag}_tok", 0) > 0:
            metrics.log_scalar(
                f"moe_{tag}_ent",
                tot[f"_moe_{tag}_ent"] / tot[f"_moe_{tag}_tok"],
                tot[f"_moe_{tag}_tok"],
                round=3,
            )
        calls = tot.get(f"_moe_{tag}_calls", 0)
        if calls > 0:
            metrics.log_scalar(f"moe_{tag}_aux", tot[f"_moe_{tag}_aux"] / calls, calls, round=3)
            for key in ("z", "bias"):
                if f"_moe_{tag}_{key}" in tot:
                    mean = tot[f"_moe_{tag}_{key}"] / calls
                    metrics.log_scalar(f"moe_{tag}_{key}", mean, calls, round=3)
