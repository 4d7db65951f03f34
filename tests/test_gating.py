# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Routing through real DeepSpeed MoE layers, checked by hand.

Experts are made rank-scaled identities (expert e computes ``(e + 1) * x`` on
positive inputs) and the router weights are set by hand, so each token's
expert, gate probability and output are known (as fairscale's MoE tests do).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from user import ds_moe
from user.modules.moe_ffn import ExpertFFN, MoEFeedForward
from user.moe_options import MoEOptions

E, C = 4, 4


def make_layer(**kw):
    opts = MoEOptions(sides=frozenset({"enc"}), num_experts=E, min_capacity=0, use_rts=False,
                      top2_2nd_expert_sampling=False, **kw)
    layer = MoEFeedForward(C, ExpertFFN(C, C), opts, "encoder.0", seed=1)
    with torch.no_grad():
        for e, expert in enumerate(ds_moe.local_experts(layer.moe)):
            expert.fc1.weight.copy_(torch.eye(C))
            expert.fc1.bias.zero_()
            expert.fc2.weight.copy_(torch.eye(C) * (e + 1))
            expert.fc2.bias.zero_()
        ds_moe.moe_gate(layer.moe).wg.weight.copy_(torch.eye(E) * 3)
    return layer


def tokens_for(experts):
    """T x 1 x C tokens; token i prefers expert experts[i] (logit 3 vs 0.3)."""
    x = torch.full((len(experts), 1, C), 0.1)
    for i, e in enumerate(experts):
        x[i, 0, e] = 1.0
    return x


def test_top1_output_is_gate_prob_times_chosen_expert():
    layer = make_layer(top_k=1)
    route = [0, 1, 2, 3, 1, 0, 3, 2]
    x = tokens_for(route)
    y = layer(x)
    probs = F.softmax(x.reshape(-1, C) @ (torch.eye(E) * 3).t(), dim=-1)
    for i, e in enumerate(route):
        expected = probs[i, e] * (e + 1) * x[i, 0]
        torch.testing.assert_close(y[i, 0], expected)
    assert layer.exp_counts.tolist() == [2, 2, 2, 2]
    # l_aux = E * sum_e mean_prob_e * fraction_e
    expected_aux = E * (probs.mean(0) * torch.tensor([0.25] * 4)).sum()
    torch.testing.assert_close(layer.l_aux, expected_aux)


def test_top2_combines_two_experts_with_normalised_weights():
    layer = make_layer(top_k=2)
    x = tokens_for([2])
    x[0, 0, 1] = 0.6  # second choice: expert 1
    layer.eval()
    y = layer(x)
    p = F.softmax(x.reshape(-1, C) @ (torch.eye(E) * 3).t(), dim=-1)[0]
    expected = (p[2] * 3 + p[1] * 2) / (p[2] + p[1]) * x[0, 0]
    torch.testing.assert_close(y[0, 0], expected)


def test_tokens_over_capacity_are_dropped_in_training_only():
    layer = make_layer(top_k=1, capacity_factor=1.0)
    x = tokens_for([0] * 8)  # all to expert 0, capacity ceil(8 / 4) = 2
    kept = (layer(x).abs().sum(-1) > 0).sum().item()
    assert kept == 2
    layer.eval()  # inference drops nothing by default
    assert (layer(x).abs().sum(-1) > 0).all()


def test_eval_drop_tokens_uses_eval_capacity_factor():
    layer = make_layer(top_k=1, eval_drop_tokens=True, eval_capacity_factor=2.0)
    layer.eval()
    x = tokens_for([0] * 8)  # capacity ceil(8 / 4 * 2) = 4
    assert (layer(x).abs().sum(-1) > 0).sum().item() == 4


def test_padding_tokens_take_no_capacity():
    layer = make_layer(top_k=1)
    x = tokens_for([0] * 6)  # capacity 2; the first four positions are padding
    pad = torch.tensor([[True, True, True, True, False, False]])
    y = layer(x, pad)
    assert (y[4:].abs().sum(-1) > 0).all(), "real tokens lost their slots to padding"
    assert layer.exp_counts.tolist() == [2, 0, 0, 0]


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "deepspeed"])
def test_top2_padding_tokens_take_no_capacity(fast_dispatch):
    layer = make_layer(top_k=2, capacity_factor=1.0)
    layer.fast_dispatch = fast_dispatch
    # 8 tokens, capacity ceil(8 / 4 * 2) = 4; all prefer expert 0, then expert 1.
    # The first four are padding: unmasked, they fill both experts' four slots
    # and every real token is dropped.
    x = tokens_for([0] * 8)
    pad = torch.tensor([[True] * 4 + [False] * 4])
    y = layer(x, pad)
    p = F.softmax(x.reshape(-1, C) @ (torch.eye(E) * 3).t(), dim=-1)[4]
    expected = (p[0] * 1 + p[1] * 2) / (p[0] + p[1]) * x[4, 0]
    for i in range(4, 8):
        torch.testing.assert_close(y[i, 0], expected)
    assert (y[:4] == 0).all()
    assert layer.exp_counts.tolist() == [4, 4, 0, 0]


def test_top2gating_used_is_deepspeeds_gate_with_a_mask():
    from deepspeed.moe import sharded_moe

    torch.manual_seed(0)
    logits = torch.randn(40, E)
    for sampling in (False, True):
        torch.manual_seed(1)
        ours = ds_moe.top2gating_used(logits.clone(), 1.0, 2, True, None, sampling, True,
                                      used_token=torch.ones(40))
        torch.manual_seed(1)
        theirs = sharded_moe.top2gating(logits.clone(), 1.0, 2, True, None, sampling, True)
        for a, b in zip(ours, theirs):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # masked tokens: no route, no slot; the others' slots close up
    used = torch.ones(40)
    used[::3] = 0
    _, _, _, idx, loc, _, counts = ds_moe.top2gating_used(logits, 4.0, 2, True, None, False, True,
                                                          used_token=used)
    assert (idx[:, ::3] == -1).all() and (idx[:, used.bool()] >= 0).all()
    assert counts.sum() == 2 * used.sum()
    for e in range(E):
        slots = sorted(loc[idx == e].tolist())
        assert slots == list(range(len(slots)))


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "deepspeed"])
@pytest.mark.parametrize("k", [1, 2])
def test_experts_without_tokens_give_zero_gradients_not_nan(fast_dispatch, k):
    layer = make_layer(top_k=k, capacity_factor=4.0)
    layer.fast_dispatch = fast_dispatch
    x = tokens_for([0] * 6).requires_grad_()  # top-1: experts 1-3 idle; top-2: 2-3 idle
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        layer.zero_grad()
        y = layer(x)
        (y.sum() + layer.l_aux).backward()
        assert torch.isfinite(y).all() and torch.isfinite(layer.l_aux)
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(ds_moe.moe_gate(layer.moe).wg.weight.grad).all()
        for e, expert in enumerate(ds_moe.local_experts(layer.moe)):
            for p in expert.parameters():
                if e >= k:  # no token: zero gradient (DeepSpeed's buffer or our empty batch)
                    assert p.grad is None or (p.grad == 0).all()
                else:
                    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "deepspeed"])
@pytest.mark.parametrize("k", [1, 2])
def test_router_runs_in_fp32_under_half_precision(monkeypatch, dtype, fast_dispatch, k):
    """--fp16/--bf16 make the whole model half precision; the router's logits and
    softmax stay fp32 (DeepSpeed's gate, and our inference routes)."""
    from deepspeed.moe import sharded_moe
    from user.modules import moe_ffn

    seen = []

    def spy(fn):
        def wrapped(logits, *args, **kwargs):
            seen.append(logits.dtype)
            return fn(logits, *args, **kwargs)
        return wrapped

    for name in ("top1gating", "top2gating"):
        monkeypatch.setattr(sharded_moe, name, spy(getattr(sharded_moe, name)))
    monkeypatch.setattr(moe_ffn, "no_drop_routes", spy(moe_ffn.no_drop_routes))
    layer = make_layer(top_k=k, capacity_factor=4.0).to(dtype)
    layer.fast_dispatch = fast_dispatch
    x = tokens_for([0, 1, 2, 3, 1, 0]).to(dtype)
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
    assert seen and set(seen) == {torch.float32}
    assert layer.l_aux.dtype == torch.float32


def test_fewer_tokens_than_min_capacity():
    # one greedy decoding step: 1 token, DeepSpeed asserts tokens >= min_capacity
    opts = MoEOptions(sides=frozenset({"dec"}), num_experts=E, min_capacity=4)
    layer = MoEFeedForward(C, ExpertFFN(C, 8), opts, "decoder.0", seed=1).eval()
    y = layer(torch.randn(1, 1, C))
    assert y.shape == (1, 1, C) and torch.isfinite(y).all()


def test_experts_start_different_and_seeding_is_by_global_index():
    opts = MoEOptions(sides=frozenset({"enc"}), num_experts=E)
    layer = MoEFeedForward(C, ExpertFFN(C, 8), opts, "encoder.1", seed=7)
    w = [e.fc1.weight for e in ds_moe.local_experts(layer.moe)]
    for i in range(E):
        for j in range(i + 1, E):
            assert not torch.equal(w[i], w[j]), f"experts {i} and {j} start identical"
    again = MoEFeedForward(C, ExpertFFN(C, 8), opts, "encoder.1", seed=7)
    assert all(torch.equal(a.fc1.weight, b.fc1.weight) for a, b in zip(
        ds_moe.local_experts(layer.moe), ds_moe.local_experts(again.moe)))
    assert ds_moe.expert_seed(7, "encoder.1", 3) != ds_moe.expert_seed(7, "decoder.1", 3)


def test_router_is_shared_and_experts_are_rank_local():
    layer = make_layer(top_k=1)
    gate_params = list(ds_moe.moe_gate(layer.moe).parameters())
    assert gate_params and not any(ds_moe.is_expert_param(p) for p in gate_params)
    expert_params = [p for e in ds_moe.local_experts(layer.moe) for p in e.parameters()]
    assert expert_params and all(ds_moe.is_expert_param(p) for p in expert_params)


def test_gradients_reach_router_and_chosen_experts():
    layer = make_layer(top_k=1)
    x = tokens_for([0, 1, 0, 1])
    out = layer(x)
    (out.sum() + layer.l_aux).backward()
    assert ds_moe.moe_gate(layer.moe).wg.weight.grad.abs().sum() > 0
    grads = [e.fc2.weight.grad for e in ds_moe.local_experts(layer.moe)]
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None or grads[2].abs().sum() == 0
