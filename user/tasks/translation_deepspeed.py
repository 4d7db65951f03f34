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
* ``--upcycle-from DENSE.pt`` starts an MoE model from a trained dense one;
  expert-parallel checkpoints are saved as shards (see :mod:`user.checkpoint`);
* the plugin's flags are checked when fairseq sets the task up and builds the model
  (the same checks ``user/train.py`` runs first, see :func:`user.moe_options.validate`);
* with ``--ep-world-size`` > 1 on several processes, beam search (generation
  and ``--eval-bleu``) runs in lockstep across the expert-parallel ranks (see
  :mod:`user.lockstep`); a rank whose share of the data is exhausted gets
  dummy batches so it keeps serving its experts;
* expert load is logged (see :mod:`user.expert_stats`); the console prints the routing
  summary unless ``--moe-console-metrics all``.
"""

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.data import BaseWrapperDataset
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .. import ds_moe, expert_stats, lockstep, patches
from ..checkpoint import ExpertLayout
from ..checkpoint.format import SHARD_KEY
from ..moe_options import validate

logger = logging.getLogger(__name__)

DUMMY = "lockstep_dummy"


class DummyWhenEmpty(BaseWrapperDataset):
    """A dataset whose empty batch is a dummy batch instead of nothing.

    fairseq gives a rank whose share of the data has run out an empty batch, which
    ``fairseq-generate`` skips; an expert-parallel rank must keep serving its experts
    to the others, so it gets a batch marked :data:`DUMMY` (see ``inference_step``).
    """

    def collater(self, samples):
        if samples:
            return self.dataset.collater(samples)
        none = torch.zeros(0, 1, dtype=torch.long)
        return {
            "id": torch.zeros(0, dtype=torch.long),
            "nsentences": 0,
            "ntokens": 0,
            "net_input": {"src_tokens": none, "src_lengths": torch.zeros(0, dtype=torch.long)},
            "target": None,
            DUMMY: True,
        }


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


@register_task("translation_deepspeed", dataclass=TranslationDeepSpeedConfig)
class TranslationDeepSpeedTask(TranslationTask):
    """Translation with DeepSpeed MoE models (any ``transformer_ds_moe_*`` arch).

    Owns what the run knows about its experts: :attr:`expert_layout` (how the model
    holds them; checkpoints are converted to it), :attr:`expert_params` (this
    process's expert parameters) and, during a save, :attr:`pending_expert_shards`.

    Args:
        cfg (TranslationDeepSpeedConfig): task options.
        src_dict (~fairseq.data.Dictionary): source dictionary.
        tgt_dict (~fairseq.data.Dictionary): target dictionary.
    """

    cfg: TranslationDeepSpeedConfig

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        validate(cfg, task="translation_deepspeed")  # before fairseq reads the data directory
        patches.install(patches.TASK)
        return super().setup_task(cfg, **kwargs)

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.model_loss_names: Optional[list] = None
        self.expert_layout: Optional[ExpertLayout] = None  # an MoE model was built
        self.expert_params: list = []
        self.pending_expert_shards: Optional[dict] = None  # set while saving
        # generation with an expert-parallel model on several processes: exhausted
        # ranks get dummy batches (see get_batch_iterator)
        self.lockstep_dummies = False

    def build_model(self, cfg, from_checkpoint=False):
        world = ds_moe.process_count()
        # a model built from a checkpoint (generation, hub) has the training run's saved
        # flags: only the rules about the model apply to them
        validate(
            cfg,
            model_only=from_checkpoint,
            world=world,
            task="translation_deepspeed",
            cuda=torch.cuda.is_available() and not getattr(cfg, "cpu", False),
        )
        model = super().build_model(cfg, from_checkpoint)
        moe_layers = [m.moe for m in getattr(model, "moe_ffn_layers", dict)().values()]
        if moe_layers:
            opts = model.moe_opts
            ds_moe.setup_expert_parallel(moe_layers, opts.ep_size)
            self.expert_params = [p for m in moe_layers for p in ds_moe.expert_params(m)]
            local = sum(p.numel() for p in self.expert_params)
            # fairseq's own "num. expert model params" counts only parameters marked
            # rank-local, i.e. 0 with --ep-world-size 1: say what the model holds
            logger.info(
                f"MoE: {len(moe_layers)} layers ({', '.join(model.moe_ffn_layers())}), "
                f"{opts.num_experts} experts each, top-{opts.top_k}, --ep-world-size {opts.ep_size}: "
                f"{opts.num_experts // opts.ep_size} experts per layer in this process, "
                f"{local:,} expert parameters here ({local * opts.ep_size:,} in the model)"
            )
            self.expert_layout = ExpertLayout.of(model)
            expert_stats.CONSOLE_METRICS.set(opts.console_metrics)
            # fairseq builds a model from a checkpoint for generation, interactive and hub
            self.lockstep_dummies = from_checkpoint and world > 1 and opts.ep_size > 1
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
        :mod:`user.checkpoint`) or the parameter order (so a consolidated
        checkpoint can be resharded without building the model)."""
        if self.pending_expert_shards is not None:
            return {SHARD_KEY: dict(self.pending_expert_shards)}
        if self.expert_layout is not None:
            return {"param_names": list(self.expert_layout.param_names)}
        return {}

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
        # a dummy batch (ignore_grad) adds no load to the balancing bias
        counted = ds_moe.uncounted_load(model) if ignore_grad else contextlib.nullcontext()
        with counted:
            loss, sample_size, logging_output = super().train_step(
                sample, model, criterion, optimizer, update_num, ignore_grad
            )
        ep = self.expert_layout.ep_size if self.expert_layout is not None else 1
        # fairseq's legacy_ddp reduces on the micro-batch that is not under no_sync()
        if ep > 1 and not getattr(model, "accumulate_grads", False):
            ds_moe.reduce_expert_grads(self.expert_params, ep)
        logging_output.update(expert_stats.expert_load_stats(model))
        return loss, sample_size, logging_output

    def optimizer_step(self, optimizer, model, update_num):
        """fairseq's optimizer step, then the gates' balancing bias (``--moe-bias-balance``)."""
        super().optimizer_step(optimizer, model, update_num)
        ds_moe.balance_gates(model)

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's batch iterator; when generating with an expert-parallel model
        on several processes, a rank whose shard has run out gets a dummy batch
        (instead of an empty one, which fairseq-generate skips) so that it keeps
        taking part in the other ranks' all-to-alls."""
        if self.lockstep_dummies:
            dataset = DummyWhenEmpty(dataset)
        return super().get_batch_iterator(dataset, *args, **kwargs)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """fairseq's beam search, in lockstep across expert-parallel ranks (EP > 1)."""
        inner = [expert_stats.unwrap_model(m) for m in models]
        if not any(lockstep.needs_lockstep(m) for m in inner):
            return super().inference_step(generator, models, sample, prefix_tokens, constraints)
        with lockstep.active(inner) as (model,):
            if sample.get(DUMMY):
                lockstep.dummy_encoder(model)
                hypos = []
            else:
                hypos = super().inference_step(
                    generator, models, sample, prefix_tokens, constraints
                )
            lockstep.drain(model)
        return hypos

    def valid_step(self, sample, model, criterion):
        """fairseq's validation step (loss, and BLEU with ``--eval-bleu``) plus the routing
        statistics of the loss forward (decoding for BLEU collects none)."""
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        logging_output.update(expert_stats.expert_load_stats(model))
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        expert_stats.log_routing_metrics(logging_outputs)
