# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The MoE feed-forward block: DeepSpeed's ``MoE`` over fairseq-style experts."""

from typing import Optional

import torch
from fairseq import utils
from fairseq.modules import FairseqDropout
from fairseq.modules.quant_noise import quant_noise
from torch import Tensor, nn

from .. import ds_moe
from ..moe_options import MoEOptions


class ExpertFFN(nn.Module):
    """One expert: the Transformer FFN ``fc2(dropout(act(fc1(x))))``.

    Args:
        embed_dim (int): model dimension.
        ffn_dim (int): hidden dimension (the encoder's or decoder's FFN size).
        activation_fn (str): fairseq activation name (``--activation-fn``).
        activation_dropout (float): dropout after the activation.
        q_noise (float): quant-noise amount, as fairseq's ``build_fc1``.
        qn_block_size (int): quant-noise block size.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ):
        super().__init__()
        self.fc1 = quant_noise(nn.Linear(embed_dim, ffn_dim), q_noise, qn_block_size)
        self.fc2 = quant_noise(nn.Linear(ffn_dim, embed_dim), q_noise, qn_block_size)
        self.activation_fn = utils.get_activation_fn(activation=activation_fn)
        self.activation_dropout_module = FairseqDropout(
            float(activation_dropout), module_name=self.__class__.__name__
        )

    def forward(self, x: Tensor) -> Tensor:
        # ... x C -> ... x C
        x = self.activation_fn(self.fc1(x))
        x = self.activation_dropout_module(x)
        return self.fc2(x)


class MoEFeedForward(nn.Module):
    """A DeepSpeed MoE layer in place of a Transformer FFN block.

    After each forward, ``l_aux`` holds the layer's gate (load-balancing) loss
    and ``exp_counts`` the number of tokens routed to each expert (``E``).
    Across expert-parallel ranks, set ``agreed_tokens`` to the largest token
    count of the group (the model does, once per forward): every rank then
    sizes its dispatch buffers for that count, so the all-to-all shapes match.

    Args:
        embed_dim (int): model dimension.
        expert (ExpertFFN): the expert to replicate.
        opts (MoEOptions): MoE options.
        layer_key (str): unique layer name (seeds the experts).
        seed (int): the run's seed.
    """

    def __init__(self, embed_dim: int, expert: nn.Module, opts: MoEOptions, layer_key: str, seed: int):
        super().__init__()
        self.opts = opts
        self.moe = ds_moe.build_moe(embed_dim, expert, opts, layer_key, seed)
        self.l_aux: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.agreed_tokens: Optional[int] = None
        # routing statistics of the last forward (the model turns this on in
        # training and validation, not in incremental decoding)
        self.collect_stats = False
        self.stats: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        # Inference drops no token unless asked: a dropped token silently
        # degrades a translation.
        gate = ds_moe.moe_gate(self.moe)
        gate.drop_tokens = self.opts.drop_tokens if mode else self.opts.eval_drop_tokens
        # DeepSpeed samples top-2's second expert in eval too: keep inference deterministic.
        gate.top2_2nd_expert_sampling = self.opts.top2_2nd_expert_sampling and mode
        return self

    @torch.no_grad()
    def _routing_stats(self, x: Tensor, padding_mask: Optional[Tensor]) -> dict:
        """Gate entropy over the real (non-padding) tokens, from the router's fp32 softmax."""
        T, B, C = x.shape
        real = x.reshape(T * B, C)
        if padding_mask is not None:
            real = real[~padding_mask.t().reshape(-1)]
        probs = torch.softmax(ds_moe.moe_gate(self.moe).wg(real.float()), dim=-1)  # S x E
        ent = -(probs * torch.log(probs.clamp_min(1e-9))).sum(-1)
        return {"tokens": float(real.size(0)), "entropy": float(ent.sum())}

    @torch.no_grad()
    def _load_stats(self, n: int, drop: bool) -> dict:
        """Tokens per expert and tokens over capacity (dropped) in the last forward.

        DeepSpeed fills each expert's ``capacity`` slots in order and drops the
        rest, so an expert that was sent ``c`` tokens drops ``max(c - capacity, 0)``.
        """
        counts = self.exp_counts.detach().float().cpu()
        if drop:
            cap = ds_moe.dispatch_capacity(
                self.agreed_tokens if self.agreed_tokens is not None else n, self.opts, self.training)
            dropped = float((counts - cap).clamp_min(0).sum())
        else:
            dropped = 0.0
        return {"counts": counts, "dropped": dropped, "routed": float(counts.sum()),
                "aux": float(self.l_aux.detach()) if self.l_aux is not None else 0.0}

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x (Tensor): ``T x B x C``.
            padding_mask (Tensor, optional): ``B x T``, True at padding; padding
                tokens then take no expert capacity (top-1 with token dropping).

        Returns:
            Tensor of shape ``T x B x C``.
        """
        T, B, C = x.shape
        tokens = x.reshape(T * B, C)
        used = None
        gate = ds_moe.moe_gate(self.moe)
        if padding_mask is not None and self.opts.top_k == 1 and gate.drop_tokens:
            # B x T -> T*B, in the same order as ``tokens``
            used = (~padding_mask).t().reshape(-1).to(tokens.dtype)
        drop = gate.drop_tokens
        short = self.opts.min_capacity - tokens.size(0) if self.opts.top_k == 1 else 0
        if short > 0:
            # DeepSpeed's top-1 gate asserts tokens >= min_capacity (e.g. one greedy step)
            tokens = torch.cat([tokens, tokens.new_zeros(short, C)])
            if used is not None:
                used = torch.cat([used, used.new_zeros(short)])
        if self.agreed_tokens is not None:
            # Size the buffers for the group's largest token count, the same on every
            # rank, without padding (padding would shift the gate loss): see
            # ds_moe.capacity_factor_for. Without dropping, every expert gets room for
            # all of the largest rank's tokens, so nothing is dropped and DeepSpeed's
            # no-drop path (one all-reduce per layer for the capacity) is not taken.
            if drop:
                want = ds_moe.dispatch_capacity(self.agreed_tokens, self.opts, self.training)
            else:
                want = self.agreed_tokens
            gate.capacity_factor = gate.eval_capacity_factor = ds_moe.capacity_factor_for(
                want, tokens.size(0), self.opts
            )
            gate.drop_tokens = True
        if self.collect_stats:
            self.stats = self._routing_stats(x, padding_mask)
        try:
            out, self.l_aux, self.exp_counts = self.moe(tokens, used)
            if self.collect_stats:
                self.stats.update(self._load_stats(tokens.size(0), drop))
        finally:
            gate.drop_tokens = drop
            gate.capacity_factor = self.opts.capacity_factor
            gate.eval_capacity_factor = self.opts.eval_capacity_factor
        return out[: T * B].view(T, B, C)
