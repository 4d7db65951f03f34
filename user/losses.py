# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Pure functions for the ``model_and_base`` criterion's loss arithmetic.

The total loss is::

    loss = w_base * base_loss + sum_i  w_i * sample_size * model_loss_i

``base_loss`` is the base criterion's loss, summed over the batch (as every
fairseq criterion returns it); ``model_loss_i`` are the model's losses, each a
per-token mean (DeepSpeed's gate loss is one); ``sample_size`` is the base
criterion's denominator (target tokens, or sentences with ``--sentence-avg``).
Scaling by ``sample_size`` makes a weight mean the same for every term: after
fairseq divides by ``sample_size``, ``w_i`` multiplies ``model_loss_i`` exactly
as ``w_base`` multiplies the per-token base loss (fairseq's ``MoECriterion``
does the same). A weight of ``None`` (JSON ``null``) drops the term; a term
without a weight weighs 1.0.
"""

import math
from types import MappingProxyType
from typing import Dict, Iterable, List, Optional, Tuple

from torch import Tensor

from .moe_options import MoEArgumentError, parse_json_flag, parse_sides

BASE = "base_crit"
#: The loss an MoE model returns: the sum over its MoE layers of DeepSpeed's ``l_aux``.
GATE_LOSS = "experts_gate_loss"
#: With ``--moe-z-loss``: the sum over MoE layers of the router z-loss (ST-MoE).
Z_LOSS = "experts_z_loss"
#: The flag that makes the model return each optional loss.
LOSS_FLAGS = MappingProxyType(
    {GATE_LOSS: "--deepspeed_moe", Z_LOSS: "--deepspeed_moe and --moe-z-loss"}
)


def model_losses(moe: bool, z_loss: bool) -> List[str]:
    """Names of the losses a model returns (besides ``base_crit``): the gate loss with MoE
    layers, and the router z-loss with ``--moe-z-loss`` too."""
    if not moe:
        return []
    return [GATE_LOSS, Z_LOSS] if z_loss else [GATE_LOSS]


def produced_by(args) -> List[str]:
    """Names of the losses the model configured by ``args`` returns (besides ``base_crit``)."""
    moe = bool(parse_sides(getattr(args, "deepspeed_moe", None)))
    return model_losses(moe, getattr(args, "moe_z_loss", False))


def parse_loss_weights(text: Optional[str]) -> Dict[str, Optional[float]]:
    """Parse ``--loss-weights``: a JSON object of name -> number or null.

    Raises:
        MoEArgumentError: naming the flag, for malformed JSON or a non-number weight.
    """
    if text is None or text.strip() == "":
        return {}
    weights = parse_json_flag("--loss-weights", text, '{"base_crit": 1, "experts_gate_loss": 0.01}')
    for name, w in weights.items():
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
        ):
            raise MoEArgumentError(
                f"--loss-weights: the weight of {name!r} must be a finite number or null, got {w!r}"
            )
        if w is not None and w < 0:
            # a negative weight makes training maximise that loss
            raise MoEArgumentError(
                f"--loss-weights: the weight of {name!r} must be >= 0, got {w!r}; use 0 or "
                "null to leave a loss out"
            )
    return {k: (None if w is None else float(w)) for k, w in weights.items()}


def check_loss_names(weights: Dict[str, Optional[float]], produced: Iterable[str]) -> None:
    """Fail if ``--loss-weights`` names a loss nobody produces, or weighs every loss
    that is produced zero or null (nothing to train on: fairseq would train on a zero
    loss, or, all null, fail at the first update after its setup).

    Args:
        weights: parsed ``--loss-weights``.
        produced: names of the model's losses (``base_crit`` is always produced).
    """
    known = {BASE, *produced}
    unknown = sorted(set(weights) - known)
    if unknown:
        needs = [f"{n} exists only with {LOSS_FLAGS[n]}" for n in unknown if n in LOSS_FLAGS]
        raise MoEArgumentError(
            f"--loss-weights names {', '.join(map(repr, unknown))}, which no component "
            f"produces; known losses: {', '.join(sorted(known))}"
            + (f" ({'; '.join(needs)})" if needs else "")
        )
    if Z_LOSS in known and Z_LOSS not in weights:
        # an unnamed loss weighs 1: about 1000 times the z-loss weight ST-MoE recommends
        raise MoEArgumentError(
            f"--moe-z-loss: give {Z_LOSS} its weight in --loss-weights, e.g. "
            f'\'{{"base_crit": 1, "{GATE_LOSS}": 0.01, "{Z_LOSS}": 0.001}}\' (ST-MoE\'s '
            "1e-3); unnamed, it would weigh 1"
        )
    if not any(weights.get(name, 1.0) for name in known):  # a missing name weighs 1.0
        raise MoEArgumentError(
            f"--loss-weights gives every loss a zero or null weight ({', '.join(sorted(known))}): "
            f"nothing to train on; give {BASE} a positive weight (usually 1)"
        )


def weight_warning(weights: Dict[str, Optional[float]]) -> Optional[str]:
    """One line of advice when a model loss weighs more than 1, else None.

    A model loss is a per-token mean, scaled like the per-token base loss (the module
    docstring), so its weight is comparable to ``base_crit``'s: the reference plugin's
    ``experts_gate_loss: 10`` (its gate loss was unscaled: 10 there acted like about 1e-5
    does here) would make load balancing outweigh translation here. Training goes on:
    a user may want a large weight on purpose.

    Args:
        weights: parsed ``--loss-weights``.
    """
    heavy = [(n, w) for n, w in weights.items() if n != BASE and w is not None and w > 1]
    if not heavy:
        return None
    named = ", ".join(f"{n} {w:g}" for n, w in heavy)
    return (
        f"--loss-weights: {named} {'is' if len(heavy) == 1 else 'are'} above 1: a model loss "
        "is a per-token mean, scaled like the per-token translation loss, so this makes load "
        "balancing outweigh translation; use about 0.01 (the reference plugin's gate loss was "
        "unscaled: its 10 acted like about 1e-5 does here); see "
        "docs/moe-options.md#choosing-the-gate-loss-weight"
    )


def combine_losses(
    base_loss: Tensor,
    model_losses: Dict[str, Tensor],
    weights: Dict[str, Optional[float]],
    sample_size: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Weighted sum of the base loss and the model losses.

    Args:
        base_loss (Tensor): summed base criterion loss (scalar).
        model_losses: name -> per-token mean loss (scalar tensors).
        weights: name -> weight or None (dropped); missing names weigh 1.0.
        sample_size (float): the base criterion's sample size.

    Returns:
        ``(total, terms)`` where ``terms`` maps each kept name (``base_crit``
        included) to its weighted, summed contribution; ``total = sum(terms)``.
    """
    terms: Dict[str, Tensor] = {}
    w = weights.get(BASE, 1.0)
    if w is not None:
        terms[BASE] = w * base_loss.float()
    for name, value in model_losses.items():
        w = weights.get(name, 1.0)
        if w is not None and value is not None:
            terms[name] = w * sample_size * value.float()
    if not terms:
        raise MoEArgumentError("--loss-weights drops every loss (all null): nothing to train on")
    total = sum(terms.values())
    return total, terms
