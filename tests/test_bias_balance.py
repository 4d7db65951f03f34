# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Balancing without an auxiliary loss (``--moe-bias-balance``, DeepSeek-V3): the bias
chooses the experts but leaves their weights alone (by hand, both dispatch paths, in
training and evaluation, top-1 and top-2), it moves toward an even load after each
update, and in real training it balances the experts with no gate loss at all; it is
saved, and checkpoints with and without it load either way. Expert parallelism is in
tests/test_expert_parallel.py (``ep2_bias_balance``)."""

import json

import pytest
import torch

from mt_run import fairseq_log
from mt_run.recipes import MICRO
from user import ds_moe
from user.checkpoint import io

from conftest import USER_DIR, run_cli
from moe_helpers import C, E, build, hand_checkable_layer, sample_batch

# fmt: off
MOE_LAYERS = ["--deepspeed_moe", "enc,dec", "--num-experts", "4", "--moe-freq", "1",
              "--criterion", "model_and_base", "--loss-weights", '{"base_crit": 1}',
              "--base-criterion", "label_smoothed_cross_entropy"]
# fmt: on

PATHS = pytest.mark.parametrize("fast_dispatch", [False, True], ids=["buffers", "local"])


@PATHS
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_bias_chooses_the_experts_not_their_weights(fast_dispatch, k, train):
    layer = hand_checkable_layer(
        fast_dispatch, top_k=k, bias_balance=0.01, drop_tokens=False
    ).train(train)
    gate = ds_moe.moe_gate(layer.moe)
    x = torch.rand(6, 2, C) + 0.1  # T x B x C, positive: expert e computes (e + 1) * x
    probs = torch.softmax(3 * x, dim=-1)  # the router's logits are 3 * x
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 2.0, 0.0]))  # more than any gap
    out = layer(x)
    assert layer.exp_counts.tolist()[2] == 12, "every token chose expert 2 first"
    if k == 1:
        want = probs[..., 2:3] * 3 * x  # its weight: the unbiased probability
    else:
        # the second expert: the most probable of the others, by the biased scores (the
        # bias is the same for them, so by probability); weights normalised over both
        others = probs.clone()
        others[..., 2] = -1
        p2, j = probs[..., 2:3], others.argmax(-1, keepdim=True)
        pj = probs.gather(-1, j)
        want = (p2 * 3 * x + pj * (j + 1) * x) / (p2 + pj)
    torch.testing.assert_close(out, want)


def test_balance_moves_the_bias_toward_the_mean_load_and_counts_training_only():
    layer = hand_checkable_layer(None, bias_balance=0.1)
    gate = ds_moe.moe_gate(layer.moe)
    assert gate.expert_bias.tolist() == [0.0] * E
    layer.eval()(torch.rand(5, 1, C))
    assert gate.load.tolist() == [0.0] * E, "evaluation and decoding count no load"
    gate.balance(torch.tensor([10.0, 0.0, 3.0, 3.0]))  # mean 4
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    x = torch.zeros(3, 1, C)
    x[:, 0, 1] = 1.0  # three tokens for expert 1
    layer.train()(x)
    layer(x)
    assert gate.load.tolist() == [0.0, 6.0, 0.0, 0.0], "the update's forwards add up"
    gate.balance(gate.load)
    assert gate.load.tolist() == [0.0] * E, "the next update counts afresh"
    # a layer without the flag has no bias (nothing saved) and counts nothing
    plain = ds_moe.moe_gate(hand_checkable_layer(None).moe)
    assert plain.expert_bias is None and plain.load is None
    assert not any(k.endswith("expert_bias") for k in plain.state_dict())


def test_the_load_is_real_tokens_and_the_bias_stays_fp32():
    # without dropping, padding takes routes too, but no load
    layer = hand_checkable_layer(None, bias_balance=0.1, top_k=2, drop_tokens=False)
    gate = ds_moe.moe_gate(layer.moe)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True  # B x T: the second sentence is 3 tokens long
    layer(torch.rand(5, 2, C) + 0.1, pad)
    assert gate.load.sum().item() == 2 * 8, "two routes for each of the 8 real tokens"
    # a half-precision model keeps the bias in fp32 (bf16 cannot add 0.001 to 0.5)
    for dtype in (torch.float16, torch.bfloat16):
        gate = ds_moe.moe_gate(hand_checkable_layer(None, bias_balance=0.001).to(dtype).moe)
        assert gate.expert_bias.dtype == torch.float32 and gate.wg.weight.dtype == dtype
        gate.expert_bias.fill_(0.5)
        gate.balance(torch.tensor([0.0, 4.0, 4.0, 4.0]))
        assert gate.expert_bias[0].item() == pytest.approx(0.501)


def test_a_dummy_batch_adds_no_load(tiny_data):
    """fairseq's dummy batch (a rank without data replays a batch, ignore_grad) trains
    nothing, so its routes are not the experts' load either."""
    task, model = build(tiny_data, "transformer_ds_moe", *MOE_LAYERS, "--moe-bias-balance", "0.01")
    criterion = task.build_criterion(model.args)
    gates = [ds_moe.moe_gate(m.moe) for m in model.moe_ffn_layers().values()]

    class Optimizer:
        def backward(self, loss):
            loss.backward()

    model.train()
    task.train_step(sample_batch(task), model, criterion, Optimizer(), 0, ignore_grad=True)
    assert all(g.load.sum() == 0 for g in gates)
    task.train_step(sample_batch(task), model, criterion, Optimizer(), 0)
    assert all(g.load.sum() > 0 for g in gates)


def train(tiny_data, save, updates, *extra, gate_weight=0.0):
    """MICRO trained ``updates`` updates (one process), its json records and its log."""
    weights = json.dumps({"base_crit": 1, "experts_gate_loss": gate_weight})
    # fmt: off
    proc = run_cli(["python", USER_DIR / "train.py", tiny_data["databin"], *MICRO,
                    "--seed", "3", "--cpu", "--max-update", updates, "--save-dir", save,
                    "--disable-validation", "--loss-weights", weights, *extra])
    # fmt: on
    text = proc.stdout + proc.stderr
    return fairseq_log.parse(text)["train_inner"], text


def last_imbalance(records, n=10):
    return sum(float(r["moe_imbalance"]) for r in records[-n:]) / n


@pytest.mark.timeout(240)
def test_training_balances_the_experts_without_a_gate_loss(tiny_data, tmp_path):
    """No gate loss: the experts' load drifts apart, unless the bias balances it. The bias
    is saved and logged per layer; a run without it resumes with it (from 0), and a run
    with it resumes without it (a warning)."""
    plain, _ = train(tiny_data, tmp_path / "plain", 40)
    balanced, _ = train(tiny_data, tmp_path / "bias", 40, "--moe-bias-balance", "0.01")
    assert last_imbalance(balanced) < 0.75 * last_imbalance(plain), (
        last_imbalance(balanced),
        last_imbalance(plain),
    )
    assert float(balanced[-1]["moe_enc0_bias"]) > 0 and "moe_enc0_bias" not in plain[-1]
    saved = io.read_checkpoint(str(tmp_path / "bias" / "checkpoint_last.pt"))["model"]
    biases = [v for k, v in saved.items() if k.endswith(".gate.expert_bias")]
    assert len(biases) == 2 and all(b.abs().max() > 0 for b in biases)  # enc0 and dec0
    # resumed with the flag from a checkpoint without the biases, and the other way
    records, log = train(tiny_data, tmp_path / "plain", 45, "--moe-bias-balance", "0.01")
    assert "2 balancing biases start at 0" in log and float(records[-1]["num_updates"]) == 45
    records, log = train(tiny_data, tmp_path / "bias", 45)
    assert "balancing biases are not used" in log and float(records[-1]["num_updates"]) == 45
