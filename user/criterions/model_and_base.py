# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The ``model_and_base`` criterion: a base fairseq criterion plus model losses.

``--base-criterion NAME`` is any registered fairseq criterion, built from
``--base-criterion-config`` (JSON of its options, checked against its config);
the model's own losses (``model.get_losses(net_output, sample)``, e.g.
``experts_gate_loss``) are added with ``--loss-weights``. See
:mod:`user.losses` for the formula. One forward pass serves both: the base
criterion sees the already computed network output.

Logged: the base criterion's metrics (``nll_loss``, ``ppl``, ...), ``loss``
(the weighted total) and ``loss_<name>`` for each weighted term, all in the
same unit (base 2, per sample-size unit), so ``loss = sum of loss_<name>``.
"""

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import (
    CRITERION_DATACLASS_REGISTRY,
    CRITERION_REGISTRY,
    FairseqCriterion,
    register_criterion,
)
from fairseq.dataclass import FairseqDataclass
from omegaconf import OmegaConf

from .. import losses
from ..moe_options import MoEArgumentError, parse_json_flag

logger = logging.getLogger(__name__)

# logging-output key naming the base criterion (summable: its value is 1 per output)
BASE_KEY = "_base_criterion:"


@dataclass
class ModelAndBaseCriterionConfig(FairseqDataclass):
    base_criterion: str = field(
        default="label_smoothed_cross_entropy",
        metadata={"help": "registered fairseq criterion for the main objective"},
    )
    base_criterion_config: str = field(
        default="{}",
        metadata={
            "help": "options of the base criterion as a JSON object, "
            "e.g. '{\"label_smoothing\": 0.1}'"
        },
    )
    loss_weights: str = field(
        default="{}",
        metadata={
            "help": "JSON object of loss name -> weight: 'base_crit' for the base "
            "criterion, model loss names (experts_gate_loss) for the rest; null drops a "
            "term, unnamed terms weigh 1.0; model losses are scaled by the sample size"
        },
    )


class _PrecomputedModel:
    """Stands in for the model so a criterion reuses an existing net output."""

    def __init__(self, model, net_output):
        self._model = model
        self._net_output = net_output

    def __call__(self, *args, **kwargs):
        return self._net_output

    def __getattr__(self, name):
        return getattr(self._model, name)


def _interpolation_target(default):
    if isinstance(default, str) and default.startswith("${") and default.endswith("}"):
        return default[2:-1]
    return None


def resolve_base_criterion(name: str, config_json: str, root_cfg=None):
    """Check ``--base-criterion``/``--base-criterion-config`` and return ``(cls, cfg)``.

    Needs no task, so the entry points can check the flags before any work;
    build with ``cls.build_criterion(cfg, task)``.

    Args:
        name (str): a registered criterion name (``--base-criterion``).
        config_json (str): JSON object of its options (``--base-criterion-config``).
        root_cfg: the full fairseq config, to resolve options such as
            ``sentence_avg`` that criteria take from other sections.

    Raises:
        MoEArgumentError: naming the flag, for an unknown criterion, malformed JSON or
            an option the criterion does not have.
    """
    if name not in CRITERION_REGISTRY or name == "model_and_base":
        raise MoEArgumentError(
            f"--base-criterion {name!r} is not a registered fairseq criterion; "
            f"choose one of: {', '.join(sorted(set(CRITERION_REGISTRY) - {'model_and_base'}))}"
        )
    options = parse_json_flag("--base-criterion-config", config_json, '{"label_smoothing": 0.1}')

    cls = CRITERION_REGISTRY[name]
    dc = CRITERION_DATACLASS_REGISTRY.get(name)
    if dc is not None:
        fields = {f.name: f for f in dataclasses.fields(dc) if f.name != "_name"}
        values = {}
        for fname, f in fields.items():
            target = _interpolation_target(f.default)
            if target is not None and fname not in options:
                found = OmegaConf.select(root_cfg, target) if root_cfg is not None else None
                values[fname] = found if found is not None else False
    else:
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_args(parser)
        fields = vars(parser.parse_args([]))
        values = {}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise MoEArgumentError(
            f"--base-criterion-config: {name} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(fields)) or '(none)'}"
        )
    values.update(options)
    if dc is not None:
        try:
            cfg = OmegaConf.structured(dc(**values))
        except Exception as e:  # omegaconf's validation errors have no common base
            raise MoEArgumentError(f"--base-criterion-config {config_json!r}: {e}") from None
        cfg._name = name
    else:
        cfg = argparse.Namespace(**{**fields, **values})
    return cls, cfg


@register_criterion("model_and_base", dataclass=ModelAndBaseCriterionConfig)
class ModelAndBaseCriterion(FairseqCriterion):
    """Weighted sum of a base criterion and the losses the model returns.

    Args:
        task: the fairseq task.
        cfg (ModelAndBaseCriterionConfig): criterion options.
    """

    def __init__(self, task, cfg: ModelAndBaseCriterionConfig):
        super().__init__(task)
        self.weights = losses.parse_loss_weights(cfg.loss_weights)
        advice = losses.weight_warning(self.weights)
        if advice:  # built once per process, as training starts
            logger.warning(advice)
        root = cfg._get_root() if OmegaConf.is_config(cfg) else None
        base_cls, base_cfg = resolve_base_criterion(
            cfg.base_criterion, cfg.base_criterion_config, root
        )
        self.base = base_cls.build_criterion(base_cfg, task)
        # fairseq reduces metrics through the class (no instance): the logging outputs
        # name the base criterion instead of a class attribute set by the last instance
        self._base_key = BASE_KEY + cfg.base_criterion
        self._checked = False

    def check_loss_names(self, model_loss_names):
        """Fail before training if ``--loss-weights`` names a loss the model lacks."""
        losses.check_loss_names(self.weights, model_loss_names)
        self._checked = True

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        base_loss, sample_size, logging_output = self.base(
            _PrecomputedModel(model, net_output), sample, reduce=reduce
        )
        get_losses = getattr(model, "get_losses", None)
        model_losses = get_losses(net_output, sample) if get_losses is not None else {}
        if not self._checked:
            self.check_loss_names(model_losses.keys())
        total, terms = losses.combine_losses(base_loss, model_losses, self.weights, sample_size)
        logging_output = dict(logging_output)
        logging_output[self._base_key] = 1
        logging_output["loss"] = total.data
        for name, value in terms.items():
            logging_output[f"loss_{name}"] = value.data
        return total, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        names = {
            k[len(BASE_KEY) :] for log in logging_outputs for k in log if k.startswith(BASE_KEY)
        }
        for name in sorted(names):
            CRITERION_REGISTRY[name].reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size == 0:
            return
        keys = {k for log in logging_outputs for k in log if k.startswith("loss_")}
        for k in sorted(keys):
            value = sum(float(log.get(k, 0)) for log in logging_outputs)
            metrics.log_scalar(k, value / sample_size / math.log(2), sample_size, round=3)

    def logging_outputs_can_be_summed(self) -> bool:
        return self.base.logging_outputs_can_be_summed()
