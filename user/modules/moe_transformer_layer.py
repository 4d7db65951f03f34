# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Transformer encoder/decoder layers whose FFN block is a DeepSpeed MoE layer.

fairseq's layers build ``fc1``/``fc2`` in the constructor and run them inline
in ``forward`` (there is no FFN hook), so these subclasses build no ``fc1``/
``fc2`` and override ``forward`` mirroring upstream (fairseq 0.12,
``fairseq/modules/transformer_layer.py``) with the FFN lines replaced by
:class:`~user.modules.moe_ffn.MoEFeedForward`.
"""

from typing import Dict, List, Optional

import torch
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from ..moe_options import MoEOptions
from .moe_ffn import ExpertFFN, MoEFeedForward


def _build_moe_ffn(cfg, side_cfg, opts: MoEOptions, layer_key: str, seed: int) -> MoEFeedForward:
    dense_dropout = cfg.activation_dropout or cfg.relu_dropout or 0.0
    activation_dropout = dense_dropout
    if opts.expert_dropout is not None:
        activation_dropout = opts.expert_dropout  # --moe-expert-dropout, experts only
    expert = ExpertFFN(
        side_cfg.embed_dim,
        side_cfg.ffn_embed_dim,
        activation_fn=cfg.activation_fn,
        activation_dropout=activation_dropout,
        q_noise=cfg.quant_noise.pq,
        qn_block_size=cfg.quant_noise.pq_block_size,
    )
    layer = MoEFeedForward(side_cfg.embed_dim, expert, opts, layer_key, seed)
    if opts.use_residual:
        # DeepSpeed keeps `expert` itself as PR-MoE's dense MLP (the experts are its
        # copies): that dense branch keeps --activation-dropout
        expert.activation_dropout_module.p = dense_dropout
    return layer


class MoETransformerEncoderLayer(TransformerEncoderLayerBase):
    """Encoder layer with an MoE FFN block.

    Args:
        cfg (TransformerConfig): fairseq's layer config.
        opts (MoEOptions): MoE options.
        layer_key (str): unique layer name, e.g. ``"encoder.1"``.
        seed (int): the run's seed (experts are seeded from it).
    """

    def __init__(self, cfg, opts: MoEOptions, layer_key: str, seed: int):
        super().__init__(cfg)
        self.moe_ffn = _build_moe_ffn(cfg, cfg.encoder, opts, layer_key, seed)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return None  # the experts hold the FFN weights

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return None

    def forward(
        self,
        x,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
    ):
        """
        Args:
            x (Tensor): ``T x B x C``.
            encoder_padding_mask (Tensor): ``B x T``, True at padding.
            attn_mask (Tensor, optional): ``T x T`` self-attention mask.

        Returns:
            ``T x B x C``
        """
        if attn_mask is not None:
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(
            query=x,
            key=x,
            value=x,
            key_padding_mask=encoder_padding_mask,
            need_weights=False,
            attn_mask=attn_mask,
        )
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.moe_ffn(x, encoder_padding_mask)
        fc_result = x
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)

        if self.return_fc and not torch.jit.is_scripting():
            return x, fc_result
        return x


class MoETransformerDecoderLayer(TransformerDecoderLayerBase):
    """Decoder layer with an MoE FFN block.

    Args:
        cfg (TransformerConfig): fairseq's layer config.
        opts (MoEOptions): MoE options.
        layer_key (str): unique layer name, e.g. ``"decoder.1"``.
        seed (int): the run's seed (experts are seeded from it).
        no_encoder_attn (bool): as fairseq's decoder layer.
    """

    def __init__(self, cfg, opts: MoEOptions, layer_key: str, seed: int, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        if self.ffn_layernorm is not None:
            raise ValueError("--scale-fc is not supported in MoE decoder layers")
        self.moe_ffn = _build_moe_ffn(cfg, cfg.decoder, opts, layer_key, seed)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return None  # the experts hold the FFN weights

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return None

    def forward(
        self,
        x,
        encoder_out: Optional[torch.Tensor] = None,
        encoder_padding_mask: Optional[torch.Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[torch.Tensor]] = None,
        prev_attn_state: Optional[List[torch.Tensor]] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
        self_attn_padding_mask: Optional[torch.Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """Same arguments and return value as fairseq's decoder layer.

        ``x`` is ``T x B x C`` (``T = 1`` in incremental decoding).
        """
        if need_head_weights:
            need_attn = True

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if prev_self_attn_state is not None:
            prev_key, prev_value = prev_self_attn_state[:2]
            saved_state: Dict[str, Optional[Tensor]] = {
                "prev_key": prev_key,
                "prev_value": prev_value,
            }
            if len(prev_self_attn_state) >= 3:
                saved_state["prev_key_padding_mask"] = prev_self_attn_state[2]
            assert incremental_state is not None
            self.self_attn._set_input_buffer(incremental_state, saved_state)
        _self_attn_input_buffer = self.self_attn._get_input_buffer(incremental_state)
        if self.cross_self_attention and not (
            incremental_state is not None
            and _self_attn_input_buffer is not None
            and "prev_key" in _self_attn_input_buffer
        ):
            if self_attn_mask is not None:
                assert encoder_out is not None
                self_attn_mask = torch.cat(
                    (x.new_zeros(x.size(0), encoder_out.size(0)), self_attn_mask), dim=1
                )
            if self_attn_padding_mask is not None:
                if encoder_padding_mask is None:
                    assert encoder_out is not None
                    encoder_padding_mask = self_attn_padding_mask.new_zeros(
                        encoder_out.size(1), encoder_out.size(0)
                    )
                self_attn_padding_mask = torch.cat(
                    (encoder_padding_mask, self_attn_padding_mask), dim=1
                )
            assert encoder_out is not None
            y = torch.cat((encoder_out, x), dim=0)
        else:
            y = x

        x, attn = self.self_attn(
            query=x,
            key=y,
            value=y,
            key_padding_mask=self_attn_padding_mask,
            incremental_state=incremental_state,
            need_weights=False,
            attn_mask=self_attn_mask,
        )
        if self.c_attn is not None:
            tgt_len, bsz = x.size(0), x.size(1)
            x = x.view(tgt_len, bsz, self.nh, self.head_dim)
            x = torch.einsum("tbhd,h->tbhd", x, self.c_attn)
            x = x.reshape(tgt_len, bsz, self.embed_dim)
        if self.attn_ln is not None:
            x = self.attn_ln(x)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            if prev_attn_state is not None:
                prev_key, prev_value = prev_attn_state[:2]
                saved_state: Dict[str, Optional[Tensor]] = {
                    "prev_key": prev_key,
                    "prev_value": prev_value,
                }
                if len(prev_attn_state) >= 3:
                    saved_state["prev_key_padding_mask"] = prev_attn_state[2]
                assert incremental_state is not None
                self.encoder_attn._set_input_buffer(incremental_state, saved_state)

            x, attn = self.encoder_attn(
                query=x,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            x = self.dropout_module(x)
            x = self.residual_connection(x, residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        ffn_padding_mask = None
        if self_attn_padding_mask is not None and self_attn_padding_mask.shape == (
            x.size(1),
            x.size(0),
        ):
            ffn_padding_mask = self_attn_padding_mask
        x = self.moe_ffn(x, ffn_padding_mask)
        x = self.dropout_module(x)
        if self.w_resid is not None:
            residual = torch.mul(self.w_resid, residual)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        if self.onnx_trace and incremental_state is not None:
            saved_state = self.self_attn._get_input_buffer(incremental_state)
            assert saved_state is not None
            if self_attn_padding_mask is not None:
                self_attn_state = [
                    saved_state["prev_key"],
                    saved_state["prev_value"],
                    saved_state["prev_key_padding_mask"],
                ]
            else:
                self_attn_state = [saved_state["prev_key"], saved_state["prev_value"]]
            return x, attn, self_attn_state
        return x, attn, None
