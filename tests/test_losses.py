# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Pure tests of the model_and_base loss arithmetic, checked by hand."""

import pytest
import torch

from user.losses import check_loss_names, combine_losses, parse_loss_weights, weight_warning
from user.moe_options import MoEArgumentError


def test_weighted_sum_scales_model_losses_by_sample_size():
    base, gate = torch.tensor(50.0), torch.tensor(1.5)
    total, terms = combine_losses(
        base, {"experts_gate_loss": gate}, {"base_crit": 2, "experts_gate_loss": 0.1}, 20
    )
    # 2 * 50 + 0.1 * 20 * 1.5
    assert total.item() == pytest.approx(103.0)
    assert terms["base_crit"].item() == pytest.approx(100.0)
    assert terms["experts_gate_loss"].item() == pytest.approx(3.0)


def test_null_drops_a_term_and_missing_names_weigh_one():
    base, gate = torch.tensor(50.0), torch.tensor(1.5)
    total, terms = combine_losses(
        base, {"experts_gate_loss": gate}, {"experts_gate_loss": None}, 20
    )
    assert total.item() == pytest.approx(50.0) and set(terms) == {"base_crit"}
    total, terms = combine_losses(base, {"experts_gate_loss": gate}, {}, 20)
    assert total.item() == pytest.approx(80.0)
    total, terms = combine_losses(base, {"experts_gate_loss": gate}, {"base_crit": None}, 20)
    assert total.item() == pytest.approx(30.0) and set(terms) == {"experts_gate_loss"}


def test_dropping_everything_is_an_error():
    with pytest.raises(MoEArgumentError, match="drops every loss"):
        combine_losses(torch.tensor(1.0), {}, {"base_crit": None}, 1)


def test_gradient_flows_through_weighted_terms():
    gate = torch.tensor(2.0, requires_grad=True)
    total, _ = combine_losses(torch.tensor(1.0), {"g": gate}, {"g": 0.5}, 10)
    total.backward()
    assert gate.grad.item() == pytest.approx(5.0)


def test_parse_loss_weights():
    assert parse_loss_weights('{"base_crit": 1, "experts_gate_loss": null}') == {
        "base_crit": 1.0,
        "experts_gate_loss": None,
    }
    assert parse_loss_weights("") == {} and parse_loss_weights(None) == {}


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"base_crit": 1,', "--loss-weights is not valid JSON"),
        ("[1, 2]", "--loss-weights must be a JSON object"),
        ('{"base_crit": "1"}', "the weight of 'base_crit' must be a finite number"),
        ('{"base_crit": true}', "must be a finite number"),
    ],
)
def test_malformed_loss_weights(text, match):
    with pytest.raises(MoEArgumentError, match=match):
        parse_loss_weights(text)


def test_unknown_loss_name():
    check_loss_names({"base_crit": 1, "experts_gate_loss": 2}, ["experts_gate_loss"])
    with pytest.raises(
        MoEArgumentError, match="--loss-weights names 'gate_loss', which no component produces"
    ):
        check_loss_names({"gate_loss": 1}, ["experts_gate_loss"])
    with pytest.raises(MoEArgumentError, match="exists only with --deepspeed_moe"):
        check_loss_names({"experts_gate_loss": 1}, [])


@pytest.mark.parametrize(
    "weights,named",
    [
        ({"base_crit": 1.0, "experts_gate_loss": 10.0}, "experts_gate_loss 10"),  # the reference's
        ({"experts_gate_loss": 1.5}, "experts_gate_loss 1.5"),
        ({"base_crit": 0.5, "experts_gate_loss": 2.0}, "experts_gate_loss 2"),
    ],
)
def test_a_model_loss_weight_above_one_gets_one_line_of_advice(weights, named):
    from conftest import REPO

    line = weight_warning(weights)
    assert line is not None and "\n" not in line
    assert line.startswith(f"--loss-weights: {named} is above 1")
    assert "per-token" in line and "about 0.01" in line  # why, and the recommended weight
    page, anchor = "docs/moe-options.md", "#choosing-the-gate-loss-weight"
    assert page + anchor in line
    assert "### Choosing the gate-loss weight" in (REPO / page).read_text()  # the pointer holds


@pytest.mark.parametrize(
    "weights",
    [
        {},
        {"experts_gate_loss": 0.01},
        {"experts_gate_loss": 1.0},  # the default (unnamed terms weigh 1)
        {"experts_gate_loss": None},
        {"base_crit": 10.0, "experts_gate_loss": 0.01},  # the base loss is not a model loss
    ],
)
def test_no_advice_for_model_loss_weights_up_to_one(weights):
    assert weight_warning(weights) is None
