# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""MoE command-line flags, their defaults and their validation.

Pure Python (no DeepSpeed import), so the checks run, and fail with one clear
message naming the flag, before anything is built or written.
Our own flags are named after DeepSpeed's ``MoE`` arguments
(``capacity_factor`` -> ``--moe-capacity-factor``); ``--deepspeed_moe``,
``--num-experts``, ``--ep-world-size`` and ``--top-k`` follow the reference CLI.
"""

import argparse
from dataclasses import dataclass, replace
from typing import FrozenSet, Optional

SIDES = ("enc", "dec")
NOISY_GATE_POLICIES = ("None", "Jitter", "RSample")


class MoEArgumentError(ValueError):
    """A bad MoE flag value; the message names the flag and the fix."""


@dataclass(frozen=True)
class MoEOptions:
    """Validated options of every MoE layer in a model.

    Args:
        sides: subset of ``{"enc", "dec"}`` that gets MoE layers.
        num_experts (int): experts per MoE layer (all ranks together).
        ep_size (int): expert-parallel world size.
        top_k (int): experts per token.
        freq (int): every ``freq``-th layer is MoE (1 = all layers).
        capacity_factor (float): expert capacity factor in training.
        eval_capacity_factor (float): the same in evaluation when tokens are dropped.
        min_capacity (int): minimum slots per expert.
        noisy_gate_policy (str or None): ``None``, ``"Jitter"`` or ``"RSample"``.
        drop_tokens (bool): drop tokens over capacity in training.
        eval_drop_tokens (bool): drop tokens over capacity in evaluation/inference.
        use_rts (bool): random token selection when over capacity.
        use_residual (bool): residual MoE (PR-MoE): a dense MLP beside the experts.
        top2_2nd_expert_sampling (bool): top-2 picks the 2nd expert with Gumbel noise.
    """

    sides: FrozenSet[str] = frozenset()
    num_experts: int = 8
    ep_size: int = 1
    top_k: int = 1
    freq: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    noisy_gate_policy: Optional[str] = None
    drop_tokens: bool = True
    eval_drop_tokens: bool = False
    use_rts: bool = True
    use_residual: bool = False
    top2_2nd_expert_sampling: bool = True

    def is_moe_layer(self, side: str, index: int) -> bool:
        """Whether layer ``index`` (0-based) of ``side`` is an MoE layer (GShard: every freq-th)."""
        return side in self.sides and (index + 1) % self.freq == 0


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    """Add the MoE flags. Defaults are set by the architectures (fairseq's model
    flags are parsed with ``argparse.SUPPRESS``), see :func:`moe_defaults`."""
    # fmt: off
    parser.add_argument("--deepspeed_moe", "--deepspeed-moe", type=str, metavar="enc|dec|enc,dec",
                        help="replace FFN blocks by DeepSpeed MoE layers in the encoder, decoder or "
                             "both; absent or empty = dense model")
    parser.add_argument("--num-experts", type=int, metavar="N",
                        help="experts per MoE layer, all processes together (default 8)")
    parser.add_argument("--ep-world-size", type=int, metavar="E",
                        help="expert-parallel world size: experts are split over E processes; "
                             "must divide --num-experts and the number of processes (default 1)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="experts per token, 1 <= K <= --num-experts (default 1)")
    parser.add_argument("--moe-freq", type=int, metavar="N",
                        help="every N-th layer of an MoE side is MoE, 1 = every layer (default 2)")
    parser.add_argument("--moe-capacity-factor", type=float, metavar="F",
                        help="DeepSpeed capacity_factor: training capacity per expert is "
                             "ceil(tokens / experts * F) (x2 for top-2) (default 1.0)")
    parser.add_argument("--moe-eval-capacity-factor", type=float, metavar="F",
                        help="DeepSpeed eval_capacity_factor, used in evaluation when "
                             "--moe-eval-drop-tokens is set (default 1.0)")
    parser.add_argument("--moe-min-capacity", type=int, metavar="N",
                        help="DeepSpeed min_capacity: minimum slots per expert (default 4)")
    parser.add_argument("--moe-noisy-gate-policy", choices=NOISY_GATE_POLICIES,
                        help="DeepSpeed noisy_gate_policy (top-1 only) (default None)")
    parser.add_argument("--moe-drop-tokens", dest="moe_drop_tokens", action="store_true",
                        help="drop tokens over expert capacity in training (default)")
    parser.add_argument("--no-moe-drop-tokens", dest="moe_drop_tokens", action="store_false",
                        help="never drop tokens in training (capacity = largest expert load)")
    parser.add_argument("--moe-eval-drop-tokens", dest="moe_eval_drop_tokens", action="store_true",
                        help="drop tokens over capacity in evaluation and generation too")
    parser.add_argument("--no-moe-eval-drop-tokens", dest="moe_eval_drop_tokens",
                        action="store_false",
                        help="never drop tokens in evaluation and generation (default)")
    parser.add_argument("--moe-use-rts", dest="moe_use_rts", action="store_true",
                        help="DeepSpeed use_rts: random token selection over capacity (default)")
    parser.add_argument("--no-moe-use-rts", dest="moe_use_rts", action="store_false",
                        help="keep the first tokens instead of a random selection")
    parser.add_argument("--moe-use-residual", action="store_true",
                        help="DeepSpeed use_residual: residual MoE (PR-MoE)")
    parser.add_argument("--moe-top2-2nd-expert-sampling", dest="moe_top2_2nd_expert_sampling",
                        action="store_true",
                        help="DeepSpeed top2_2nd_expert_sampling: top-2 samples the second "
                             "expert with Gumbel noise in training (default)")
    parser.add_argument("--no-moe-top2-2nd-expert-sampling", dest="moe_top2_2nd_expert_sampling",
                        action="store_false", help="top-2 takes the second-best expert")
    # fmt: on


def moe_defaults(args) -> None:
    """Fill in MoE defaults on an architecture's ``args`` (keeps given values)."""
    d = MoEOptions()
    args.deepspeed_moe = getattr(args, "deepspeed_moe", None) or ""
    args.num_experts = getattr(args, "num_experts", d.num_experts)
    args.ep_world_size = getattr(args, "ep_world_size", d.ep_size)
    args.top_k = getattr(args, "top_k", d.top_k)
    args.moe_freq = getattr(args, "moe_freq", d.freq)
    args.moe_capacity_factor = getattr(args, "moe_capacity_factor", d.capacity_factor)
    args.moe_eval_capacity_factor = getattr(
        args, "moe_eval_capacity_factor", d.eval_capacity_factor
    )
    args.moe_min_capacity = getattr(args, "moe_min_capacity", d.min_capacity)
    args.moe_noisy_gate_policy = getattr(args, "moe_noisy_gate_policy", None)
    args.moe_drop_tokens = getattr(args, "moe_drop_tokens", d.drop_tokens)
    args.moe_eval_drop_tokens = getattr(args, "moe_eval_drop_tokens", d.eval_drop_tokens)
    args.moe_use_rts = getattr(args, "moe_use_rts", d.use_rts)
    args.moe_use_residual = getattr(args, "moe_use_residual", d.use_residual)
    args.moe_top2_2nd_expert_sampling = getattr(
        args, "moe_top2_2nd_expert_sampling", d.top2_2nd_expert_sampling
    )


def parse_sides(value: Optional[str]) -> FrozenSet[str]:
    """Parse ``--deepspeed_moe``: ``""``/None -> dense, else a comma list of enc/dec."""
    if value is None or value.strip() == "":
        return frozenset()
    parts = [p.strip() for p in value.split(",")]
    bad = [p for p in parts if p not in SIDES]
    if bad:
        raise MoEArgumentError(
            f"--deepspeed_moe {value!r}: unknown part {bad[0]!r}; use enc, dec or enc,dec "
            f"(or leave it out for a dense model)"
        )
    return frozenset(parts)


def options_from_args(args) -> MoEOptions:
    """Validate the MoE flags on ``args`` and return them as :class:`MoEOptions`.

    Raises:
        MoEArgumentError: with a message naming the flag and the fix.
    """
    sides = parse_sides(getattr(args, "deepspeed_moe", None))
    d = MoEOptions()

    def get(name, default):
        v = getattr(args, name, None)
        return default if v is None else v

    opts = MoEOptions(
        sides=sides,
        num_experts=get("num_experts", d.num_experts),
        ep_size=get("ep_world_size", d.ep_size),
        top_k=get("top_k", d.top_k),
        freq=get("moe_freq", d.freq),
        capacity_factor=float(get("moe_capacity_factor", d.capacity_factor)),
        eval_capacity_factor=float(get("moe_eval_capacity_factor", d.eval_capacity_factor)),
        min_capacity=get("moe_min_capacity", d.min_capacity),
        noisy_gate_policy=get("moe_noisy_gate_policy", None),
        drop_tokens=bool(get("moe_drop_tokens", d.drop_tokens)),
        eval_drop_tokens=bool(get("moe_eval_drop_tokens", d.eval_drop_tokens)),
        use_rts=bool(get("moe_use_rts", d.use_rts)),
        use_residual=bool(get("moe_use_residual", d.use_residual)),
        top2_2nd_expert_sampling=bool(
            get("moe_top2_2nd_expert_sampling", d.top2_2nd_expert_sampling)
        ),
    )
    if opts.noisy_gate_policy == "None":
        opts = replace(opts, noisy_gate_policy=None)
    if not sides:
        return opts
    if opts.num_experts < 1:
        raise MoEArgumentError(f"--num-experts {opts.num_experts}: must be at least 1")
    if opts.ep_size < 1:
        raise MoEArgumentError(f"--ep-world-size {opts.ep_size}: must be at least 1")
    if opts.num_experts % opts.ep_size != 0:
        raise MoEArgumentError(
            f"--num-experts {opts.num_experts} is not divisible by --ep-world-size "
            f"{opts.ep_size}: each expert-parallel rank holds num_experts / ep_world_size "
            f"experts; use a multiple of {opts.ep_size} experts or a divisor of "
            f"{opts.num_experts} as --ep-world-size"
        )
    if not 1 <= opts.top_k <= opts.num_experts:
        raise MoEArgumentError(
            f"--top-k {opts.top_k} is out of range: it must be between 1 and "
            f"--num-experts ({opts.num_experts})"
        )
    if opts.freq < 1:
        raise MoEArgumentError(f"--moe-freq {opts.freq}: must be at least 1 (1 = every layer)")
    if opts.capacity_factor <= 0 or opts.eval_capacity_factor <= 0:
        raise MoEArgumentError(
            "--moe-capacity-factor and --moe-eval-capacity-factor must be positive"
        )
    if opts.min_capacity < 0:
        raise MoEArgumentError(f"--moe-min-capacity {opts.min_capacity}: must be >= 0")
    if opts.noisy_gate_policy is not None and opts.top_k != 1:
        raise MoEArgumentError(
            f"--moe-noisy-gate-policy {opts.noisy_gate_policy} works with --top-k 1 only "
            f"(DeepSpeed ignores it for top-{opts.top_k}); drop the flag or use --top-k 1"
        )
    for side, flag in (("enc", "--encoder-layers"), ("dec", "--decoder-layers")):
        layers = getattr(args, "encoder_layers" if side == "enc" else "decoder_layers", 0)
        if side in sides and layers and not any(
            opts.is_moe_layer(side, i) for i in range(layers)
        ):
            raise MoEArgumentError(
                f"--deepspeed_moe {args.deepspeed_moe} with --moe-freq {opts.freq} and "
                f"{flag} {layers} places no MoE layer in the "
                f"{'encoder' if side == 'enc' else 'decoder'}; use --moe-freq 1 or more layers"
            )
    return opts
