# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The ``translation_deepspeed`` task: fairseq's ``translation`` plus what MoE needs.

* after the model is built (fairseq has set up ``torch.distributed`` by then),
  DeepSpeed's communication and expert groups are created once;
* with ``--ep-world-size`` > 1, expert gradients are reduced in their
  expert-data-parallel group after the last micro-batch of each update
  (fairseq's ``legacy_ddp`` reduces everything else, router included);
* the ``model_and_base`` criterion's ``--loss-weights`` are checked against the
  losses the model returns before training starts;
* a resumed run sees the same batches as an uninterrupted one (see
  :meth:`TranslationDeepSpeedTask.can_reuse_epoch_itr`);
* ``--upcycle-from DENSE.pt`` starts an MoE model from a trained dense one
  (see :mod:`user.upcycle`); expert-parallel checkpoints are saved as shards
  (see :mod:`user.expert_checkpoint`);
* with ``--ep-world-size`` > 1 on several processes, beam search (generation
  and ``--eval-bleu``) runs in lockstep across the expert-parallel ranks (see
  :mod:`user.lockstep`); a rank whose share of the data is exhausted gets
  dummy batches so it keeps serving its experts;
* expert load is logged: ``moe_imbalance`` = (tokens of the busiest expert) /
  (tokens per expert if perfectly balanced), averaged over MoE layers:
  1.0 is balanced, ``--num-experts`` means every token went to one expert.
"""

import functools
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from fairseq import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .. import ds_moe, expert_checkpoint, lockstep
from ..moe_options import MoEArgumentError

logger = logging.getLogger(__name__)

# Set by ``user/generate.py`` (and recognised for ``fairseq-generate``): batch
# iterators then yield a dummy batch instead of an empty one (see get_batch_iterator).
GENERATING = False
DUMMY = "lockstep_dummy"


def generating() -> bool:
    return GENERATING or os.path.basename(sys.argv[0]) == "fairseq-generate"


def _collate_or_dummy(collate, samples):
    if samples:
        return collate(samples)
    none = torch.zeros(0, 1, dtype=torch.long)
    return {"id": torch.zeros(0, dtype=torch.long), "nsentences": 0, "ntokens": 0,
            "net_input": {"src_tokens": none, "src_lengths": torch.zeros(0, dtype=torch.long)},
            "target": None, DUMMY: True}


@dataclass
class TranslationDeepSpeedConfig(TranslationConfig):
    """``translation``'s options plus upcycling; MoE options belong to the model."""

    upcycle_from: Optional[str] = field(
        default=None,
        metadata={
            "help": "start the MoE model from this dense checkpoint (same architecture "
            "without --deepspeed_moe): every expert copies the FFN it replaces, routers "
            "start fresh (sparse upcycling). Ignored when the run resumes from its own "
            "checkpoint_last.pt"
        },
    )


def unwrap_model(model):
    """The fairseq model inside DDP/FSDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_tag(name: str) -> str:
    """Short name of an MoE block: ``encoder.layers.1.moe_ffn`` -> ``enc1``."""
    m = re.search(r"(encoder|decoder)\.layers\.(\d+)\.", name)
    return f"{m.group(1)[:3]}{m.group(2)}" if m else name


def expert_load_stats(model) -> dict:
    """Summable routing statistics of the last forward, for fairseq's logging outputs.

    Returns (empty for a dense model), with ``L`` each MoE layer's tag (``enc1``):
        ``_moe_L_n<i>``: tokens sent to expert ``i``; ``_moe_L_drop``: tokens over
        capacity; ``_moe_L_routed``: token-expert assignments; ``_moe_L_tok``: real
        tokens; ``_moe_L_ent``: summed gate entropy; ``_moe_L_aux``, ``_moe_L_calls``:
        gate loss and forwards (for its mean); ``_moe_load_max``/``_moe_load_tot``:
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
        out[f"_moe_{tag}_calls"] = 1.0
    return out


def log_routing_metrics(logging_outputs) -> None:
    """Per MoE layer: ``moe_L_e<i>`` (fraction of tokens routed to expert i),
    ``moe_L_drop`` (fraction of token-expert assignments dropped), ``moe_L_ent``
    (mean gate entropy, nats; ln E = uniform), ``moe_L_aux`` (mean gate loss);
    all summed over ranks and micro-batches before dividing."""
    keys = sorted({k for log in logging_outputs for k in log if k.startswith("_moe_") and
                   k not in ("_moe_load_max", "_moe_load_tot")})
    tot = {k: sum(log.get(k, 0) for log in logging_outputs) for k in keys}
    tags = sorted({k[len("_moe_"):].rsplit("_", 1)[0] for k in keys})
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
            metrics.log_scalar(f"moe_{tag}_ent", tot[f"_moe_{tag}_ent"] / tot[f"_moe_{tag}_tok"],
                               tot[f"_moe_{tag}_tok"], round=3)
        calls = tot.get(f"_moe_{tag}_calls", 0)
        if calls > 0:
            metrics.log_scalar(f"moe_{tag}_aux", tot[f"_moe_{tag}_aux"] / calls, calls, round=3)


@register_task("translation_deepspeed", dataclass=TranslationDeepSpeedConfig)
class TranslationDeepSpeedTask(TranslationTask):
    """Translation with DeepSpeed MoE models (any ``transformer_ds_moe_*`` arch).

    Args:
        cfg (TranslationDeepSpeedConfig): task options.
        src_dict (~fairseq.data.Dictionary): source dictionary.
        tgt_dict (~fairseq.data.Dictionary): target dictionary.
    """

    cfg: TranslationDeepSpeedConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        if cfg.upcycle_from is not None and not os.path.isfile(cfg.upcycle_from):
            raise MoEArgumentError(
                f"--upcycle-from {cfg.upcycle_from}: no such file; give a dense checkpoint "
                "(e.g. checkpoint_best.pt of a run without --deepspeed_moe)"
            )
        self.model_loss_names: Optional[list] = None
        self.expert_params: list = []
        self.ep_size = 1
        self.num_experts = 0
        self.pending_expert_shards: Optional[dict] = None  # set while saving (expert_checkpoint)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        moe_layers = [m.moe for m in getattr(model, "moe_ffn_layers", dict)().values()]
        if moe_layers:
            ep_size = model.moe_opts.ep_size
            ddp_backend = getattr(cfg, "ddp_backend", "legacy_ddp")
            world = getattr(cfg, "distributed_world_size", 1)
            if ep_size > 1 and world > 1 and ddp_backend != "legacy_ddp":
                raise MoEArgumentError(
                    f"--ep-world-size {ep_size} needs --ddp-backend legacy_ddp (got "
                    f"{ddp_backend}): other backends would average the rank-local experts "
                    f"over all processes"
                )
            fp16 = getattr(cfg, "fp16", False) or getattr(cfg, "bf16", False)
            mem_eff = getattr(cfg, "memory_efficient_fp16", False) or getattr(
                cfg, "memory_efficient_bf16", False)
            if ep_size > 1 and fp16 and not mem_eff:
                raise MoEArgumentError(
                    f"--ep-world-size {ep_size} with --fp16/--bf16 needs "
                    "--memory-efficient-fp16 / --memory-efficient-bf16: fairseq's "
                    "FP16Optimizer keeps one flat fp32 copy of all parameters, so "
                    "each rank's experts could not be saved and restored on their own"
                )
            ds_moe.setup_expert_parallel(moe_layers, ep_size)
            self.expert_params = [p for m in moe_layers for p in ds_moe.expert_params(m)]
            local = sum(p.numel() for p in self.expert_params)
            opts = model.moe_opts
            # fairseq's own "num. expert model params" counts only parameters marked
            # rank-local, i.e. 0 with --ep-world-size 1: say what the model holds
            logger.info(
                f"MoE: {len(moe_layers)} layers ({', '.join(model.moe_ffn_layers())}), "
                f"{opts.num_experts} experts each, top-{opts.top_k}, --ep-world-size {ep_size}: "
                f"{opts.num_experts // ep_size} experts per layer in this process, "
                f"{local:,} expert parameters here ({local * ep_size:,} in the model)")
            self.ep_size = ep_size
            self.num_experts = model.moe_opts.num_experts
            expert_checkpoint.set_current_layout(model)
        self.model_loss_names = list(getattr(model, "loss_names", list)())
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if self.model_loss_names is not None and hasattr(criterion, "check_loss_names"):
            criterion.check_loss_names(self.model_loss_names)
        return criterion

    def get_checkpoint_dict(self) -> dict:
        """Merged into the checkpoint's ``extra_state`` by fairseq's save_checkpoint:
        the expert shards of this save (``--ep-world-size`` > 1, see
        :mod:`user.expert_checkpoint`) or the parameter order (so a consolidated
        checkpoint can be resharded without building the model)."""
        if self.pending_expert_shards is not None:
            return {expert_checkpoint.SHARD_KEY: dict(self.pending_expert_shards)}
        names = expert_checkpoint._current.get("param_names")
        return {"param_names": list(names)} if self.num_experts and names else {}

    def can_reuse_epoch_itr(self, dataset):
        """Never reuse an epoch's batches for the next epoch.

        fairseq makes batches under ``numpy_seed(seed + epoch)`` of the epoch the
        iterator was *created* in and reuses them for later epochs, so a run
        resumed in epoch 2 gets other batches than the uninterrupted run (which
        still uses epoch 1's) and training diverges after a resume. Rebuilding
        every epoch makes the batches a function of the epoch alone.
        """
        return False

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        # fairseq's legacy_ddp reduces on the micro-batch that is not under no_sync()
        if self.ep_size > 1 and not getattr(model, "accumulate_grads", False):
            ds_moe.reduce_expert_grads(self.expert_params, self.ep_size)
        logging_output.update(expert_load_stats(model))
        return loss, sample_size, logging_output

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's batch iterator; when generating with an expert-parallel model
        on several processes, a rank whose shard has run out gets a dummy batch
        (instead of an empty one, which fairseq-generate skips) so that it keeps
        taking part in the other ranks' all-to-alls."""
        itr = super().get_batch_iterator(dataset, *args, **kwargs)
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if generating() and multi and self.ep_size > 1 and hasattr(itr, "collate_fn"):
            itr.collate_fn = functools.partial(_collate_or_dummy, itr.collate_fn)
        return itr

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """fairseq's beam search, in lockstep across expert-parallel ranks (EP > 1)."""
        inner = [unwrap_model(m) for m in models]
        if not any(lockstep.needs_lockstep(m) for m in inner):
            return super().inference_step(generator, models, sample, prefix_tokens, constraints)
        with lockstep.active(inner) as (model,):
            if sample.get(DUMMY):
                lockstep.dummy_encoder(model)
                hypos = []
            else:
                hypos = super().inference_step(generator, models, sample, prefix_tokens, constraints)
            lockstep.drain(model)
        return hypos

    def valid_step(self, sample, model, criterion):
        if not self.cfg.eval_bleu:
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
            logging_output.update(expert_load_stats(model))
            return loss, sample_size, logging_output
        # the loss forward's routing, not that of the BLEU decoding that follows
        stats = {}
        forward = criterion.forward

        def forward_and_record(*args, **kwargs):
            result = forward(*args, **kwargs)
            stats.update(expert_load_stats(model))
            return result

        criterion.forward = forward_and_record
        try:
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        finally:
            del criterion.forward
        logging_output.update(stats)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        load_tot = sum(log.get("_moe_load_tot", 0) for log in logging_outputs)
        if load_tot > 0:
            load_max = sum(log.get("_moe_load_max", 0) for log in logging_outputs)
            metrics.log_scalar("moe_imbalance", load_max / load_tot, load_tot, round=3)
        log_routing_metrics(logging_outputs)
