# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Lockstep decoding across expert-parallel ranks.

Every MoE layer's forward makes all-to-alls over the expert-parallel group,
so all its ranks must run the same MoE layers the same number of times, with
what they send sized alike (the exchange's block, or DeepSpeed's buffers).
Beam search breaks both: ranks finish their
sentences after different numbers of steps, and run out of data after
different numbers of batches. While lockstep is on:

* every encoder and decoder call first agrees, in one all-reduce, on "is any
  rank still decoding" and the group's largest token count (which sizes what
  all MoE layers of that call send);
* a rank whose sentences are finished, or that has no batch left, keeps
  running dummy decoder steps (one token, no encoder) until no rank of its
  group is active (:func:`drain`); a dummy batch runs the encoder once on one
  token (:func:`dummy_encoder`).

Every rank thus makes the same sequence of encoder/decoder calls and beam
search never hangs. Outputs are unchanged: a dummy token's route goes to its
expert and back to the rank that made it, and no other token's.
"""

import contextlib
from typing import Iterable, List

import torch
import torch.distributed as dist

from . import ds_moe


def needs_lockstep(model) -> bool:
    """True for an expert-parallel MoE model in a multi-process run."""
    opts = getattr(model, "moe_opts", None)
    return (
        opts is not None
        and opts.ep_size > 1
        and bool(getattr(model, "moe_ffn_layers", dict)())
        and dist.is_available()
        and dist.is_initialized()
    )


def agree(component, active: bool, tokens: int) -> bool:
    """One all-reduce over the expert-parallel group: returns whether any rank is
    active and sets the group's largest token count on ``component``'s MoE layers."""
    opts = component.moe_opts
    any_active, most = ds_moe.agree_on_token_counts([int(active), tokens], opts.ep_size)
    for m in moe_layers(component):
        m.agreed_tokens = most
    return bool(any_active)


def moe_layers(component) -> List:
    """The MoE blocks of an encoder or decoder (found once, when it was built: a beam
    search needs them twice per decoding step)."""
    return component.moe_layers


def release(component) -> None:
    for m in moe_layers(component):
        m.agreed_tokens = None


@contextlib.contextmanager
def active(models: Iterable) -> None:
    """Turn lockstep on for the encoders and decoders of ``models`` (EP > 1 only)."""
    models = [m for m in models if needs_lockstep(m)]
    if len(models) > 1:
        raise ValueError("lockstep decoding supports one expert-parallel model, not an ensemble")
    parts = [p for m in models for p in (m.encoder, m.decoder)]
    for p in parts:
        p.lockstep = True
    try:
        yield models
    finally:
        for p in parts:
            p.lockstep = False
            release(p)


def _device(module) -> torch.device:
    return next(module.parameters()).device


def dummy_encoder(model) -> None:
    """Run the encoder on one token, for a rank that has no batch this round."""
    enc = model.encoder
    src = torch.full((1, 1), enc.dictionary.eos(), dtype=torch.long, device=_device(enc))
    with torch.no_grad():
        enc(src, src_lengths=torch.ones(1, dtype=torch.long, device=src.device))


def drain(model) -> int:
    """Dummy decoder steps until no rank of the group is decoding.

    Returns:
        the number of dummy steps run.
    """
    dec = model.decoder
    prev = torch.full((1, 1), dec.dictionary.eos(), dtype=torch.long, device=_device(dec))
    steps = 0
    with torch.no_grad():
        while agree(dec, False, 0):
            dec.lockstep = False  # already agreed for this step
            try:
                dec(prev, encoder_out=None)
            finally:
                dec.lockstep = True
            steps += 1
    release(dec)
    return steps
