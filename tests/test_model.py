# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The model through fairseq's own parser, task and registries (tiny dims)."""

import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate
from fairseq import utils
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

from user import ds_moe
from user.models.transformer_ds_moe import TransformerDSMoEModel
from user.modules.moe_transformer_layer import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
)
from user.moe_options import MoEArgumentError

from moe_helpers import build, sample_batch


def transformer_archs():
    dense = MODEL_REGISTRY["transformer"]
    return sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is dense)


def twin(arch):
    return "transformer_ds_moe" + arch[len("transformer") :]


def test_every_fairseq_transformer_arch_has_a_twin():
    missing = [a for a in transformer_archs() if twin(a) not in ARCH_MODEL_REGISTRY]
    assert not missing, f"no transformer_ds_moe twin for {missing}"
    assert all(ARCH_MODEL_REGISTRY[twin(a)] is TransformerDSMoEModel for a in transformer_archs())


@pytest.mark.parametrize("arch", transformer_archs())
def test_each_twin_builds_with_moe_and_runs(tiny_data, arch):
    task, model = build(tiny_data, twin(arch), "--deepspeed_moe", "enc,dec", "--num-experts", "2")
    assert isinstance(model, TransformerDSMoEModel)
    assert sorted(model.moe_ffn_layers()) == [
        "decoder.layers.1.moe_ffn",
        "encoder.layers.1.moe_ffn",
    ]
    batch = sample_batch(task, 2)
    out, extra = model(**batch["net_input"])
    assert out.shape[:2] == batch["target"].shape and torch.isfinite(out).all()
    assert extra["experts_gate_loss"].ndim == 0 and extra["experts_gate_loss"] > 0


@pytest.mark.parametrize("arch", ["transformer_tiny", "transformer_wmt_en_de"])
def test_without_deepspeed_moe_the_model_is_the_plain_transformer(tiny_data, arch):
    _, dense = build(tiny_data, arch)
    _, ours = build(tiny_data, twin(arch))
    a, b = dense.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed must give the same weights"
    assert not ours.moe_ffn_layers() and ours.loss_names() == []


def test_moe_layer_placement_and_expert_shapes(tiny_data):
    # fmt: off
    _, model = build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "dec", "--moe-freq", "1",
                     "--num-experts", "4", "--activation-fn", "gelu", "--activation-dropout", "0.2")
    # fmt: on
    assert not any(isinstance(layer, MoETransformerEncoderLayer) for layer in model.encoder.layers)
    assert all(isinstance(layer, MoETransformerDecoderLayer) for layer in model.decoder.layers)
    for layer in model.decoder.layers:
        assert layer.fc1 is None and layer.fc2 is None, "MoE layers keep no dense FFN"
        experts = list(ds_moe.local_experts(layer.moe_ffn.moe))
        assert len(experts) == 4
        assert experts[0].fc1.out_features == 24, "decoder experts use the decoder FFN size"
        assert experts[0].activation_fn is utils.get_activation_fn("gelu")
        assert experts[0].activation_dropout_module.p == 0.2
    names = [n for n, _ in model.named_parameters()]
    assert not any(".fc1." in n and "experts" not in n for n in names if n.startswith("decoder"))


def test_gate_options_reach_deepspeed(tiny_data):
    # fmt: off
    _, model = build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc", "--num-experts", "4",
                     "--top-k", "2", "--moe-capacity-factor", "1.5", "--moe-eval-capacity-factor", "1.75",
                     "--moe-min-capacity", "2", "--no-moe-drop-tokens", "--no-moe-use-rts",
                     "--moe-use-residual")
    # fmt: on
    moe = model.encoder.layers[1].moe_ffn.moe
    gate = ds_moe.moe_gate(moe)
    assert isinstance(gate, TopKGate)  # DeepSpeed's gate class, the plugin's routing
    assert (gate.k, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity) == (
        2,
        1.5,
        1.75,
        2,
    )
    assert gate.drop_tokens is False and gate.use_rts is False and moe.use_residual
    assert gate.eval_drop_tokens is False and gate.top2_2nd_expert_sampling is True


def test_gate_loss_is_the_sum_over_moe_layers(tiny_data):
    task, model = build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc,dec")
    batch = sample_batch(task)
    _, extra = model(**batch["net_input"])
    expected = sum(m.l_aux for m in model.moe_ffn_layers().values())
    torch.testing.assert_close(extra["experts_gate_loss"], expected)
    assert model.get_losses((None, extra), batch) == {
        "experts_gate_loss": extra["experts_gate_loss"]
    }
    assert set(model.expert_counts()) == set(model.moe_ffn_layers())


def test_bad_flags_fail_before_building(tiny_data):
    with pytest.raises(MoEArgumentError, match="--top-k 9 is out of range"):
        # fmt: off
        build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc", "--num-experts", "4",
              "--top-k", "9")
        # fmt: on


def test_ep_world_size_larger_than_the_world_is_refused(tiny_data):
    with pytest.raises(
        MoEArgumentError, match="--ep-world-size 2 must divide the number of processes"
    ):
        # fmt: off
        build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc", "--num-experts", "4",
              "--ep-world-size", "2")
        # fmt: on


def test_a_failed_forward_leaves_no_per_forward_state(tiny_data, monkeypatch):
    """fairseq catches an out-of-memory error and skips the batch: the MoE layers'
    per-forward state (agreed token counts, statistics switch) must not survive."""
    import dataclasses

    # fmt: off
    task, model = build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc,dec",
                        "--num-experts", "4", "--moe-freq", "1")
    # fmt: on
    # as with --ep-world-size 2: the forward first agrees on the group's token counts
    model.moe_opts = dataclasses.replace(model.moe_opts, ep_size=2)
    monkeypatch.setattr(ds_moe, "agree_on_token_counts", lambda counts, ep: list(counts))
    layer = model.decoder.layers[1].moe_ffn
    layer.register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    )
    batch = sample_batch(task, 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        model(**batch["net_input"])
    layers = list(model.moe_ffn_layers().values())
    assert model.encoder.layers[0].moe_ffn.agreed_tokens is None  # it did run with a count
    assert all(m.agreed_tokens is None and not m.collect_stats for m in layers)


def test_layerdrop_skips_moe_layers_and_their_gate_loss(tiny_data):
    """LayerDrop in one process: an MoE layer it skips reports no gate loss (not the one
    of its last forward) and its router gets no gradient."""
    # fmt: off
    task, model = build(tiny_data, "transformer_ds_moe", "--deepspeed_moe", "enc,dec",
                        "--moe-freq", "1", "--num-experts", "4", "--encoder-layerdrop", "1.0")
    # fmt: on
    sample = sample_batch(task)
    model.eval()  # LayerDrop skips nothing in evaluation
    with torch.no_grad():
        model(**sample["net_input"])
    enc, dec = model.encoder.moe_layers, model.decoder.moe_layers
    assert all(m.l_aux is not None for m in enc + dec)
    model.train()  # p = 1: every encoder layer is skipped
    _, extra = model(**sample["net_input"])
    assert all(m.l_aux is None for m in enc)
    torch.testing.assert_close(extra["experts_gate_loss"], sum(m.l_aux for m in dec))
    extra["experts_gate_loss"].backward()
    assert all(ds_moe.moe_gate(m.moe).wg.weight.grad is None for m in enc)
    assert all(ds_moe.moe_gate(m.moe).wg.weight.grad is not None for m in dec)
