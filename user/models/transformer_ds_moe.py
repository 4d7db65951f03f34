# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The ``transformer_ds_moe`` model and its architectures.

fairseq's Transformer whose FFN blocks are DeepSpeed MoE layers in the
encoder, the decoder or both (``--deepspeed_moe enc|dec|enc,dec``), every
``--moe-freq``-th layer. Without ``--deepspeed_moe`` it is exactly the plain
Transformer (same parameters, same names). Every fairseq ``transformer_<name>``
architecture has a twin ``transformer_ds_moe_<name>``.

The model returns the sum of its MoE layers' gate losses as
``experts_gate_loss`` and, with ``--moe-z-loss``, of their router z-losses as
``experts_z_loss`` (see :meth:`TransformerDSMoEModel.get_losses`), which
the ``model_and_base`` criterion weighs with ``--loss-weights``.
"""

import contextlib
import functools
import logging
from typing import Dict, List, Optional

import torch
import torch.utils.checkpoint
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoder,
    TransformerEncoder,
    TransformerModel,
)
from fairseq.models.transformer import transformer_legacy as tl
from torch import Tensor

from .. import ds_moe, lockstep
from ..checkpoint import fairseq_hooks
from ..checkpoint.format import MODEL_KEY
from ..losses import GATE_LOSS, Z_LOSS, model_losses
from ..modules.moe_ffn import MoEFeedForward
from ..modules.moe_transformer_layer import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
)
from ..moe_options import MoEOptions, add_moe_args, moe_defaults, options_from_args, validate

logger = logging.getLogger(__name__)


def _wrap(layer, cfg):
    if cfg.checkpoint_activations:
        checkpoint_moe_layer(layer)
    return layer


def checkpoint_moe_layer(layer) -> None:
    """``--checkpoint-activations`` for an MoE layer: its activations are recomputed in
    the backward, as fairseq's ``checkpoint_wrapper`` does for a dense layer, with two
    differences that an MoE layer needs:

    * the recompute gets the token count the model's forward agreed on with the other
      expert-parallel ranks (by then the forward has cleared it): it routes with the
      same capacity and makes the same all-to-alls, on every rank;
    * torch's non-reentrant checkpoint runs the forward with autograd on, so the gate
      loss the layer returns keeps its gradient (fairseq's runs it under ``no_grad``:
      the routers lost the load-balancing gradient).

    ``--offload-activations`` is not applied to MoE layers. fairseq's
    ``unwrap_checkpoint`` undoes this as it undoes its own wrapper.
    """
    assert not hasattr(layer, "precheckpoint_forward"), "checkpointed twice"
    layer.precheckpoint_forward = layer.forward
    # a partial of the layer, not a closure: a deep copy of the model (EMA) stays whole
    layer.forward = functools.partial(_checkpointed_moe_forward, layer)


def _checkpointed_moe_forward(layer, *args, **kwargs):
    # the agreed count is read now, in the forward, and handed to the recompute
    return torch.utils.checkpoint.checkpoint(
        _moe_layer_call, layer, layer.moe_ffn.agreed_tokens, *args, use_reentrant=False, **kwargs
    )


def _moe_layer_call(layer, agreed_tokens, *args, **kwargs):
    """The layer's own forward with its MoE block's agreed token count set for the call."""
    moe = layer.moe_ffn
    saved, moe.agreed_tokens = moe.agreed_tokens, agreed_tokens
    try:
        return layer.precheckpoint_forward(*args, **kwargs)
    finally:
        moe.agreed_tokens = saved


class MoETransformerEncoder(TransformerEncoder):
    """fairseq's encoder with MoE layers where :class:`MoEOptions` says so."""

    def __init__(self, args, dictionary, embed_tokens, opts: MoEOptions):
        # state for the build_encoder_layer hook, set before the base builds the layers
        self.moe_opts = opts
        self._layers_built = 0
        super().__init__(args, dictionary, embed_tokens)
        self.moe_layers = [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def build_encoder_layer(self, cfg):
        index, self._layers_built = self._layers_built, self._layers_built + 1
        if not self.moe_opts.is_moe_layer("enc", index):
            return super().build_encoder_layer(cfg)
        cfg = tl.TransformerConfig.from_namespace(cfg)
        seed = getattr(self.args, "seed", 1)
        return _wrap(MoETransformerEncoderLayer(cfg, self.moe_opts, f"encoder.{index}", seed), cfg)

    lockstep = False  # set by user.lockstep.active() during expert-parallel decoding

    def forward(
        self, src_tokens, src_lengths=None, return_all_hiddens: bool = False, token_embeddings=None
    ):
        if not self.lockstep:
            return super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)
        lockstep.agree(self, True, src_tokens.numel())
        try:
            return super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)
        finally:
            lockstep.release(self)


class MoETransformerDecoder(TransformerDecoder):
    """fairseq's decoder with MoE layers where :class:`MoEOptions` says so."""

    def __init__(self, args, dictionary, embed_tokens, opts: MoEOptions, no_encoder_attn=False):
        # state for the build_decoder_layer hook, set before the base builds the layers
        self.moe_opts = opts
        self._layers_built = 0
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.moe_layers = [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index, self._layers_built = self._layers_built, self._layers_built + 1
        if not self.moe_opts.is_moe_layer("dec", index):
            return super().build_decoder_layer(cfg, no_encoder_attn)
        cfg = tl.TransformerConfig.from_namespace(cfg)
        seed = getattr(self.args, "seed", 1)
        layer = MoETransformerDecoderLayer(
            cfg, self.moe_opts, f"decoder.{index}", seed, no_encoder_attn=no_encoder_attn
        )
        return _wrap(layer, cfg)

    lockstep = False  # set by user.lockstep.active() during expert-parallel decoding

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        if not self.lockstep:
            return super().forward(prev_output_tokens, encoder_out, incremental_state, **kwargs)
        # incremental decoding runs the last position only: B tokens, else B x T
        n = (
            prev_output_tokens.size(0)
            if incremental_state is not None
            else prev_output_tokens.numel()
        )
        lockstep.agree(self, True, n)
        try:
            return super().forward(prev_output_tokens, encoder_out, incremental_state, **kwargs)
        finally:
            lockstep.release(self)


_BIAS = ".gate.expert_bias"


def _fit_balance_biases(model, state_dict) -> None:
    """Make a checkpoint's balancing biases (``--moe-bias-balance``) fit ``model``'s:
    a model with them starts them at 0 from a checkpoint without (turning balancing on
    when resuming or fine-tuning), and a model without them leaves a checkpoint's out
    (turning it off: its routing then changes, which a warning says)."""
    own = {k for k, _ in model.named_buffers() if k.endswith(_BIAS)}
    given = {k for k in state_dict if k.endswith(_BIAS)}
    for key in own - given:
        state_dict[key] = torch.zeros_like(model.get_buffer(key))
    if own - given:
        logger.info(f"--moe-bias-balance: {len(own - given)} balancing biases start at 0")
    for key in given - own:
        del state_dict[key]
    if given - own:
        logger.warning(
            f"the checkpoint's {len(given - own)} balancing biases are not used "
            "(--moe-bias-balance is off here): its experts are chosen without them"
        )


@register_model("transformer_ds_moe")
class TransformerDSMoEModel(TransformerModel):
    """Transformer with DeepSpeed MoE FFN blocks.

    Args:
        args (argparse.Namespace): model flags (fairseq's Transformer flags plus
            the MoE flags of :func:`user.moe_options.add_moe_args`).
        encoder (TransformerEncoder): the encoder.
        decoder (TransformerDecoder): the decoder.
    """

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        self.moe_opts = options_from_args(args)

    @staticmethod
    def add_args(parser):
        TransformerModel.add_args(parser)
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        from ..tasks.translation_deepspeed import TranslationDeepSpeedTask

        moe_defaults(args)
        ours = isinstance(task, TranslationDeepSpeedTask)
        # fail on bad flags before building anything (any task can build this model)
        validate(
            args, model_only=True, task="translation_deepspeed" if ours else type(task).__name__
        )
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return MoETransformerEncoder(args, src_dict, embed_tokens, options_from_args(args))

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return MoETransformerDecoder(
            args,
            tgt_dict,
            embed_tokens,
            options_from_args(args),
            no_encoder_attn=getattr(args, "no_cross_attention", False),
        )

    def moe_ffn_layers(self) -> Dict[str, MoEFeedForward]:
        """The MoE blocks by module name, e.g. ``encoder.layers.1.moe_ffn``."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MoEFeedForward)}

    def loss_names(self) -> List[str]:
        """Names of the losses :meth:`get_losses` returns."""
        return model_losses(bool(self.moe_opts.sides), self.moe_opts.z_loss)

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        moe = self.encoder.moe_layers + self.decoder.moe_layers
        with self._moe_forward(src_tokens, prev_output_tokens):
            x, extra = super().forward(
                src_tokens,
                src_lengths,
                prev_output_tokens,
                return_all_hiddens=return_all_hiddens,
                features_only=features_only,
                alignment_layer=alignment_layer,
                alignment_heads=alignment_heads,
            )
        if moe:
            extra[GATE_LOSS] = _layer_sum([m.l_aux for m in moe], x)
            if self.moe_opts.z_loss:
                extra[Z_LOSS] = _layer_sum([m.z_loss for m in moe], x)
        return x, extra

    @contextlib.contextmanager
    def _moe_forward(self, src_tokens, prev_output_tokens):
        """The MoE layers' per-forward state, set for one forward and always cleared
        (fairseq catches an out-of-memory error and skips the batch: nothing stale may
        reach the next one)."""
        enc, dec = self.encoder.moe_layers, self.decoder.moe_layers
        for m in enc + dec:
            m.l_aux = m.z_loss = None  # a layer skipped by LayerDrop: no stale loss
            m.stats = {}
            m.collect_stats = True  # routing statistics for logging (not in decoding)
        try:
            if (enc or dec) and self.moe_opts.ep_size > 1:
                # one collective per forward: the group's largest encoder/decoder token counts
                agreed = ds_moe.agree_on_token_counts(
                    [src_tokens.numel(), prev_output_tokens.numel()], self.moe_opts.ep_size
                )
                for layers, tokens in ((enc, agreed[0]), (dec, agreed[1])):
                    for m in layers:
                        m.agreed_tokens = tokens
            yield
        finally:
            for m in enc + dec:
                m.agreed_tokens = None
                m.collect_stats = False

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's ``load_state_dict``; an expert-parallel rank then loads its own
        experts from the checkpoint's shards (see :mod:`user.checkpoint`)."""
        reader = state_dict.pop(MODEL_KEY, None) if state_dict else None
        if state_dict:
            _fit_balance_biases(self, state_dict)
        result = super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        if reader is not None:
            fairseq_hooks.restore_model_experts(self, reader)
        return result

    def get_losses(self, net_output, sample) -> Dict[str, Tensor]:
        """Model losses, each a per-token mean (the criterion scales by sample size).

        Returns:
            ``{"experts_gate_loss": sum over MoE layers of DeepSpeed's l_aux}``
            for an MoE model, with ``"experts_z_loss"`` (sum over MoE layers of the
            router z-loss) under ``--moe-z-loss``; ``{}`` for a dense one.
        """
        return {k: net_output[1][k] for k in (GATE_LOSS, Z_LOSS) if k in net_output[1]}

    def routing_stats(self) -> Dict[str, dict]:
        """Per MoE layer, the last forward's routing statistics: ``counts`` (tokens
        sent to each expert), ``dropped``, ``routed``, ``tokens`` (real tokens),
        ``entropy`` (summed gate entropy), ``aux`` (the layer's gate loss), ``z`` (its
        router z-loss, with ``--moe-z-loss``), ``bias`` (its balancing bias's spread,
        with ``--moe-bias-balance``)."""
        return {n: m.stats for n, m in self.moe_ffn_layers().items() if "counts" in m.stats}

    def expert_counts(self) -> Dict[str, Tensor]:
        """Tokens routed to each expert (``E``) in the last forward, per MoE layer."""
        return {
            n: m.exp_counts for n, m in self.moe_ffn_layers().items() if m.exp_counts is not None
        }


def _layer_sum(losses, x) -> Tensor:
    """Sum of the MoE layers' losses that ran (LayerDrop skips some); 0 if none did."""
    losses = [v for v in losses if v is not None]
    return torch.stack(losses).sum() if losses else x.new_zeros(())


# Architectures: one twin per fairseq ``transformer_<name>`` architecture.
# Each calls its dense parent, then sets the MoE defaults.
def _arch(name, parent):
    @register_model_architecture("transformer_ds_moe", name)
    def arch(args):
        parent(args)
        moe_defaults(args)

    arch.__name__ = name
    arch.__doc__ = f"``{parent.__name__}`` with DeepSpeed MoE options."
    return arch


transformer_ds_moe = _arch("transformer_ds_moe", tl.base_architecture)
transformer_ds_moe_tiny = _arch("transformer_ds_moe_tiny", tl.tiny_architecture)
transformer_ds_moe_iwslt_de_en = _arch("transformer_ds_moe_iwslt_de_en", tl.transformer_iwslt_de_en)
transformer_ds_moe_wmt_en_de = _arch("transformer_ds_moe_wmt_en_de", tl.transformer_wmt_en_de)
transformer_ds_moe_vaswani_wmt_en_de_big = _arch(
    "transformer_ds_moe_vaswani_wmt_en_de_big", tl.transformer_vaswani_wmt_en_de_big
)
transformer_ds_moe_vaswani_wmt_en_fr_big = _arch(
    "transformer_ds_moe_vaswani_wmt_en_fr_big", tl.transformer_vaswani_wmt_en_fr_big
)
transformer_ds_moe_wmt_en_de_big = _arch(
    "transformer_ds_moe_wmt_en_de_big", tl.transformer_wmt_en_de_big
)
transformer_ds_moe_wmt_en_de_big_t2t = _arch(
    "transformer_ds_moe_wmt_en_de_big_t2t", tl.transformer_wmt_en_de_big_t2t
)
