# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Pure tests of the MoE flags: parsing, defaults, validation messages."""

import re
from argparse import Namespace

import pytest

from user.moe_options import (
    MoEArgumentError,
    MoEOptions,
    moe_defaults,
    options_from_args,
    parse_sides,
)


def args(**kw):
    a = Namespace(encoder_layers=2, decoder_layers=2, **kw)
    moe_defaults(a)
    return a


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, set()),
        ("", set()),
        ("enc", {"enc"}),
        ("dec", {"dec"}),
        ("enc,dec", {"enc", "dec"}),
        ("dec, enc", {"enc", "dec"}),
    ],
)
def test_parse_sides(value, expected):
    assert parse_sides(value) == frozenset(expected)


@pytest.mark.parametrize("value", ["encoder", "enc,dex", "enc;dec", ","])
def test_unknown_side_names_the_flag(value):
    with pytest.raises(MoEArgumentError, match="--deepspeed_moe"):
        parse_sides(value)


def test_defaults_match_documented_values():
    opts = options_from_args(args(deepspeed_moe="enc,dec"))
    assert opts == MoEOptions(sides=frozenset({"enc", "dec"}))
    assert (opts.num_experts, opts.ep_size, opts.top_k, opts.freq) == (8, 1, 1, 2)
    assert opts.drop_tokens and not opts.eval_drop_tokens and opts.use_rts


def test_given_values_survive_defaults():
    a = args(
        deepspeed_moe="dec",
        num_experts=4,
        top_k=2,
        moe_freq=1,
        moe_capacity_factor=2.0,
        moe_drop_tokens=False,
        moe_noisy_gate_policy="None",
    )
    opts = options_from_args(a)
    assert (opts.num_experts, opts.top_k, opts.freq, opts.capacity_factor) == (4, 2, 1, 2.0)
    assert opts.drop_tokens is False and opts.noisy_gate_policy is None


def test_experts_not_divisible_by_ep_size():
    with pytest.raises(
        MoEArgumentError, match=r"--num-experts 6 is not divisible by --ep-world-size 4"
    ):
        options_from_args(args(deepspeed_moe="enc", num_experts=6, ep_world_size=4))


@pytest.mark.parametrize("k", [0, 5, -1])
def test_top_k_out_of_range(k):
    with pytest.raises(
        MoEArgumentError, match=rf"--top-k {k} is out of range.*--num-experts \(4\)"
    ):
        options_from_args(args(deepspeed_moe="enc", num_experts=4, top_k=k))


def test_dense_model_ignores_moe_values():
    # without --deepspeed_moe nothing is MoE, so MoE values are not checked
    assert options_from_args(args(num_experts=6, ep_world_size=4)).sides == frozenset()


def test_moe_freq_that_places_no_layer_is_refused():
    a = args(deepspeed_moe="enc", moe_freq=2)
    a.encoder_layers = 1
    with pytest.raises(
        MoEArgumentError, match="--moe-freq 2 and --encoder-layers 1 places no MoE layer"
    ):
        options_from_args(a)


def test_noisy_gate_needs_top1():
    with pytest.raises(
        MoEArgumentError, match="--moe-noisy-gate-policy Jitter works with --top-k 1"
    ):
        options_from_args(args(deepspeed_moe="enc", top_k=2, moe_noisy_gate_policy="Jitter"))


@pytest.mark.parametrize(
    "freq,layers,expected", [(1, 3, [0, 1, 2]), (2, 4, [1, 3]), (3, 6, [2, 5])]
)
def test_every_nth_layer_is_moe(freq, layers, expected):
    opts = MoEOptions(sides=frozenset({"enc"}), freq=freq)
    assert [i for i in range(layers) if opts.is_moe_layer("enc", i)] == expected
    assert not any(opts.is_moe_layer("dec", i) for i in range(layers))


def test_the_readme_flag_table_documents_every_flag():
    """README's MoE flag table and the flag table in the code stay one list."""
    from user.moe_options import FLAGS

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## MoE flags") :]
    table = table[: table.index("\n\n", table.index("| flag |"))]
    documented = {f for f in re.findall(r"`(--[a-z0-9_-]+)", table) if not f.endswith("-")}
    in_code = {f.names[0] for f in FLAGS}
    assert in_code - documented == set(), "flags missing from README's table"
    assert documented - in_code - {f.off for f in FLAGS} == set(), "README documents unknown flags"
