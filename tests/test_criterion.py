# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The model_and_base criterion against hand-computed values on a real model."""

import logging
import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
)
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from user.criterions.model_and_base import ModelAndBaseCriterion
from user.moe_options import MoEArgumentError

from moe_helpers import TINY, sample_batch


def setup(tiny_data, *extra, moe=True):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(tiny_data["databin"]),
            "--task",
            "translation_deepspeed",
            "--arch",
            "transformer_ds_moe_tiny",
            *TINY,
            "--criterion",
            "model_and_base",
            *(["--deepspeed_moe", "enc,dec", "--num-experts", "4"] if moe else []),
            *extra,
        ],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    model = task.build_model(cfg.model).eval()  # eval: no dropout, deterministic routing
    return task, model, task.build_criterion(cfg.criterion)


def reference(model, batch, smoothing):
    base = LabelSmoothedCrossEntropyCriterion(None, sentence_avg=False, label_smoothing=smoothing)
    base.padding_idx = 1
    net_output = model(**batch["net_input"])
    loss, nll = base.compute_loss(model, net_output, batch)
    return loss, nll, net_output[1]["experts_gate_loss"]


def test_total_is_weighted_base_plus_scaled_gate_loss(tiny_data):
    # fmt: off
    task, model, crit = setup(
        tiny_data, "--base-criterion", "label_smoothed_cross_entropy",
        "--base-criterion-config", '{"label_smoothing": 0.1}',
        "--loss-weights", '{"base_crit": 2, "experts_gate_loss": 0.5}')
    # fmt: on
    assert isinstance(crit, ModelAndBaseCriterion)
    batch = sample_batch(task)
    loss, sample_size, log = crit(model, batch)
    base, nll, gate = reference(model, batch, 0.1)
    assert sample_size == batch["ntokens"]
    torch.testing.assert_close(loss, 2 * base + 0.5 * sample_size * gate)
    torch.testing.assert_close(log["loss_base_crit"], 2 * base)
    torch.testing.assert_close(log["loss_experts_gate_loss"], 0.5 * sample_size * gate)
    torch.testing.assert_close(log["nll_loss"], nll)


Z_WEIGHTS = '{"base_crit": 1, "experts_gate_loss": 0.01, "experts_z_loss": 0.001}'


def test_z_loss_is_weighted_and_logged_like_the_gate_loss(tiny_data):
    task, model, crit = setup(tiny_data, "--moe-z-loss", "--loss-weights", Z_WEIGHTS)
    batch = sample_batch(task)
    loss, sample_size, log = crit(model, batch)
    base, _, gate = reference(model, batch, 0.0)
    z = model(**batch["net_input"])[1]["experts_z_loss"]
    assert z > 0
    torch.testing.assert_close(loss, base + 0.01 * sample_size * gate + 0.001 * sample_size * z)
    torch.testing.assert_close(log["loss_experts_z_loss"], 0.001 * sample_size * z)

    from fairseq.logging import metrics

    _, _, log = task.valid_step(batch, model, crit)
    with metrics.aggregate() as agg:
        task.reduce_metrics([log], crit)
    values = agg.get_smoothed_values()
    parts = ("base_crit", "experts_gate_loss", "experts_z_loss")
    assert values["loss"] == pytest.approx(sum(values[f"loss_{p}"] for p in parts), abs=3e-3)
    # per MoE layer, as moe_<layer>_aux: the mean router z-loss
    layers = {n: m.z_loss for n, m in model.moe_ffn_layers().items()}
    assert {"moe_enc1_z", "moe_dec1_z"} <= set(values)
    assert values["moe_enc1_z"] == pytest.approx(
        float(layers["encoder.layers.1.moe_ffn"]), abs=1e-3
    )


def test_without_the_flag_no_z_loss_is_computed_or_logged(tiny_data):
    task, model, crit = setup(tiny_data, "--loss-weights", '{"experts_gate_loss": 0.01}')
    _, _, log = crit(model, sample_batch(task))
    assert "loss_experts_z_loss" not in log
    assert all(m.z_loss is None for m in model.moe_ffn_layers().values())


def test_null_and_unnamed_weights(tiny_data):
    task, model, crit = setup(tiny_data, "--loss-weights", '{"experts_gate_loss": null}')
    batch = sample_batch(task)
    loss, _, log = crit(model, batch)
    base, _, gate = reference(model, batch, 0.0)  # default base: label_smoothed_cross_entropy, 0.0
    torch.testing.assert_close(loss, base)
    assert "loss_experts_gate_loss" not in log
    task, model, crit = setup(tiny_data)
    loss, sample_size, _ = crit(model, batch)
    torch.testing.assert_close(loss, base + sample_size * gate)


def test_sentence_avg_reaches_the_base_criterion(tiny_data):
    task, model, crit = setup(tiny_data, "--sentence-avg")
    batch = sample_batch(task)
    _, sample_size, _ = crit(model, batch)
    assert crit.base.sentence_avg and sample_size == batch["target"].size(0)


def test_any_registered_base_criterion(tiny_data):
    task, model, crit = setup(tiny_data, "--base-criterion", "cross_entropy", moe=False)
    batch = sample_batch(task)
    loss, sample_size, log = crit(model, batch)
    lprobs = model.get_normalized_probs(model(**batch["net_input"]), log_probs=True)
    expected = torch.nn.functional.nll_loss(
        lprobs.view(-1, lprobs.size(-1)), batch["target"].view(-1), ignore_index=1, reduction="sum"
    )
    torch.testing.assert_close(loss, expected)


def test_reduced_metrics_add_up(tiny_data):
    from fairseq.logging import metrics

    task, model, crit = setup(tiny_data, "--loss-weights", '{"experts_gate_loss": 0.1}')
    batch = sample_batch(task)
    _, _, log = task.valid_step(batch, model, crit)
    with metrics.aggregate() as agg:
        task.reduce_metrics([log], crit)
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(
        values["loss_base_crit"] + values["loss_experts_gate_loss"], abs=2e-3
    )
    assert values["loss"] == pytest.approx(
        float(log["loss"]) / log["sample_size"] / math.log(2), abs=1e-3
    )
    assert "nll_loss" in values and "ppl" in values and values["moe_imbalance"] >= 1.0


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            ["--base-criterion", "no_such_crit"],
            "--base-criterion 'no_such_crit' is not a registered",
        ),
        (
            ["--base-criterion-config", "{label_smoothing: 0.1}"],
            "--base-criterion-config is not valid JSON",
        ),
        (["--base-criterion-config", '{"smoothing": 0.1}'], "has no option 'smoothing'"),
        (["--loss-weights", '{"base_crit": 1'], "--loss-weights is not valid JSON"),
        (
            ["--loss-weights", '{"gate": 1}'],
            "--loss-weights names 'gate', which no component produces",
        ),
        (
            ["--loss-weights", Z_WEIGHTS],
            "--loss-weights names 'experts_z_loss', which no component produces; known "
            r"losses: base_crit, experts_gate_loss \(experts_z_loss exists only with --deepspeed_moe and --moe-z-loss",
        ),
        (["--moe-z-loss"], "--moe-z-loss: give experts_z_loss its weight in --loss-weights"),
        (
            ["--moe-z-loss", "--loss-weights", '{"experts_z_loss": -0.001}'],
            "the weight of 'experts_z_loss' must be >= 0",
        ),
    ],
)
def test_bad_criterion_flags(tiny_data, extra, match):
    with pytest.raises(MoEArgumentError, match=match):
        setup(tiny_data, *extra)


def test_two_criteria_reduce_their_own_base_metrics(tiny_data, monkeypatch):
    """fairseq reduces metrics through the criterion's class: the base criterion is
    named by the logging outputs, not by a class attribute the last instance set."""
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    task, model, smoothed = setup(tiny_data, "--base-criterion", "label_smoothed_cross_entropy")
    _, _, plain = setup(tiny_data, "--base-criterion", "cross_entropy")  # built second
    calls = []
    for cls in (LabelSmoothedCrossEntropyCriterion, CrossEntropyCriterion):
        monkeypatch.setattr(
            cls, "reduce_metrics", classmethod(lambda c, logs, cls=cls: calls.append(cls.__name__))
        )
    batch = sample_batch(task)
    for crit in (smoothed, plain):
        _, _, log = crit(model, batch)
        type(crit).reduce_metrics([log])
    assert calls == ["LabelSmoothedCrossEntropyCriterion", "CrossEntropyCriterion"]


def test_a_gate_weight_above_one_is_warned_once_when_the_criterion_is_built(tiny_data, caplog):
    """The reference plugin's weight of 10: training goes on, after one warning."""
    with caplog.at_level(logging.WARNING):
        task, model, crit = setup(
            tiny_data, "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 10}'
        )
    (warning,) = [r for r in caplog.records if "--loss-weights" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "experts_gate_loss 10" in warning.getMessage()
    total, _, _ = crit(model, sample_batch(task))  # the criterion works as weighted
    assert torch.isfinite(total)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        setup(tiny_data, "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 0.01}')
    assert [r for r in caplog.records if "--loss-weights" in r.getMessage()] == []
