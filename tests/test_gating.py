# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Routing through real DeepSpeed MoE layers, checked by hand, and the gating
functions (``user/modules/gating.py``) against DeepSpeed's, bit for bit.

Experts are made rank-scaled identities (expert e computes ``(e + 1) * x`` on
positive inputs) and the router weights are set by hand, so each token's
expert, gate probability and output are known (as fairscale's MoE tests do).
"""

import copy
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe

from user import ds_moe
from user.modules import gating
from user.modules.moe_ffn import ExpertFFN, MoEFeedForward
from user.moe_options import MoEOptions

from moe_helpers import C, E, hand_checkable_layer

make_layer = hand_checkable_layer


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


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_huge_capacity_factor_keeps_every_token(k):
    """A factor above experts / k means room for every token: 1e30 overflowed DeepSpeed's
    float32 capacity to the minimum and dropped nearly every token."""
    layer = make_layer(
        top_k=k, capacity_factor=1e30, eval_capacity_factor=1e30, eval_drop_tokens=True
    )
    gate = ds_moe.moe_gate(layer.moe)
    for training in (True, False):
        layer.train(training)
        assert gate.capacity(40) == 40
        assert (layer(tokens_for([0] * 8)).abs().sum(-1) > 0).all()


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


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
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


def without_num_experts(deepspeed_routes):
    """DeepSpeed's sparse routes ``(l_aux, capacity, E, indices, locations, gates, counts)``
    in the order of :class:`gating.Routes`."""
    l_aux, capacity, _, *rest = deepspeed_routes
    return (l_aux, capacity, *rest)


def test_top2gating_is_deepspeeds_gate_with_a_mask():
    torch.manual_seed(0)
    logits = torch.randn(40, E)
    for sampling in (False, True):
        torch.manual_seed(1)
        ours = gating.top2gating(
            logits.clone(),
            gating.expert_capacity(40, E, 1.0, 2, 2),
            torch.ones(40),
            top2_2nd_expert_sampling=sampling,
        )
        torch.manual_seed(1)
        theirs = sharded_moe.top2gating(logits.clone(), 1.0, 2, True, None, sampling, True)
        for a, b in zip(ours, without_num_experts(theirs), strict=True):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # masked tokens: no route, no slot; the others' slots close up
    used = torch.ones(40)
    used[::3] = 0
    _, _, idx, loc, _, counts = gating.top2gating(
        logits, gating.expert_capacity(40, E, 4.0, 2, 2), used
    )
    assert (idx[:, ::3] == -1).all() and (idx[:, used.bool()] >= 0).all()
    assert counts.sum() == 2 * used.sum()
    for e in range(E):
        slots = sorted(loc[idx == e].tolist())
        assert slots == list(range(len(slots)))


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
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
                    assert (
                        p.grad is not None
                        and torch.isfinite(p.grad).all()
                        and p.grad.abs().sum() > 0
                    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
@pytest.mark.parametrize("k", [1, 2])
def test_router_runs_in_fp32_under_half_precision(monkeypatch, dtype, fast_dispatch, k):
    """--fp16/--bf16 make the whole model half precision; the router's logits and
    softmax stay fp32 (the gate's policies, and the inference routes)."""
    seen = []

    def spy(fn):
        def wrapped(logits, *args, **kwargs):
            seen.append(logits.dtype)
            return fn(logits, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        gating, "GATING", MappingProxyType({n: spy(fn) for n, fn in gating.GATING.items()})
    )
    monkeypatch.setattr(gating, "no_drop_routes", spy(gating.no_drop_routes))
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
    assert all(
        torch.equal(a.fc1.weight, b.fc1.weight)
        for a, b in zip(ds_moe.local_experts(layer.moe), ds_moe.local_experts(again.moe))
    )
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


# -- the gating functions against DeepSpeed's ------------------------------------------


def test_capacity_is_deepspeeds():
    factors = [0.01, 0.1, 0.3, 0.5, 0.7, 1.0, 1.1, 1.25, 4 / 3, 1.5, 2.0, 2.5, 3.7, 8.0]
    for S in [*range(0, 70), 127, 128, 129, 1000, 1023, 1024, 4095, 4096, 8191, 12345, 65536]:
        for num_experts in (1, 3, 4, 8, 64):
            for f in factors:
                for k in (1, 2, 3):
                    for min_cap in (0, 4):
                        want = sharded_moe._capacity(
                            torch.empty(S, num_experts), torch.tensor(f * k), torch.tensor(min_cap)
                        )
                        got = gating.expert_capacity(S, num_experts, f, k, min_cap)
                        assert got == int(want), (S, num_experts, f, k, min_cap)


def routed_logits(S=40, num_experts=E, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(S, num_experts)
    logits[:, 0] += 1.0  # a favourite expert: over capacity
    logits[3] = logits[4]  # a tie between tokens
    logits[5, 1:3] = 5.0  # a tie between experts: the first wins
    return logits


def assert_same_routes(ours, theirs):
    """Our :class:`gating.Routes` against DeepSpeed's sparse routes, bit for bit (DeepSpeed's
    counts are float when it is given a mask: compared by value)."""
    theirs = without_num_experts(theirs)
    for name, a, b in zip(gating.Routes._fields, ours, theirs, strict=True):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if name == "counts":
            b = b.to(a.dtype)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "no_drop"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "used"])
@pytest.mark.parametrize("noise", [None, "RSample"])
@pytest.mark.parametrize("use_rts", [False, True], ids=["first", "rts"])
def test_top1gating_is_deepspeeds_bit_for_bit(use_rts, noise, masked, drop):
    logits = routed_logits()
    used = None
    if masked:
        used = torch.ones(40)
        used[::3] = 0
    capacity = gating.expert_capacity(40, E, 0.5, 1, 4) if drop else None
    torch.manual_seed(1)
    ours = gating.top1gating(
        logits.clone(), capacity, used, noisy_gate_policy=noise, use_rts=use_rts
    )
    ours_rng = torch.get_rng_state()
    torch.manual_seed(1)
    if masked and not drop:
        # DeepSpeed's no-drop top-1 gate fails with a mask (topk's k a tensor): compare
        # with room for every token, which drops nothing either
        theirs = sharded_moe.top1gating(
            logits.clone(), E, 4, used, noise, use_rts=use_rts, sparse_routes=True
        )
        assert int(theirs[1]) == 40 and ours.capacity == int(ours.counts.max())
        ours = ours._replace(capacity=40)
    else:
        theirs = sharded_moe.top1gating(
            logits.clone(),
            0.5,
            4,
            used,
            noise,
            drop_tokens=drop,
            use_rts=use_rts,
            sparse_routes=True,
        )
    assert torch.equal(ours_rng, torch.get_rng_state()), "other random numbers drawn"
    assert_same_routes(ours, theirs)
    assert bool((ours.indices >= 0).sum() < ours.counts.sum()) == drop  # dropped, or not


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "no_drop"])
@pytest.mark.parametrize("masked", [False, True], ids=["none", "ones"])
@pytest.mark.parametrize("sampling", [False, True])
def test_top2gating_is_deepspeeds_bit_for_bit(sampling, masked, drop):
    logits = routed_logits()
    capacity = gating.expert_capacity(40, E, 0.5, 2, 4) if drop else None
    torch.manual_seed(1)
    ours = gating.top2gating(
        logits.clone(),
        capacity,
        torch.ones(40) if masked else None,
        top2_2nd_expert_sampling=sampling,
    )
    ours_rng = torch.get_rng_state()
    torch.manual_seed(1)
    theirs = sharded_moe.top2gating(logits.clone(), 0.5, 4, drop, None, sampling, True)
    assert torch.equal(ours_rng, torch.get_rng_state()), "other random numbers drawn"
    assert_same_routes(ours, theirs)
    assert bool((ours.indices >= 0).sum() < ours.counts.sum()) == drop


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "no_drop"])
@pytest.mark.parametrize("masked", [False, True], ids=["none", "ones"])
@pytest.mark.parametrize("k", [3, 4])
def test_topkgating_is_deepspeeds_bit_for_bit(k, masked, drop):
    logits = routed_logits(num_experts=6)
    capacity = gating.expert_capacity(40, 6, 0.5, k, 4) if drop else None
    ours = gating.topkgating(logits.clone(), capacity, torch.ones(40) if masked else None, k=k)
    theirs = sharded_moe.topkgating(logits.clone(), k, 0.5, 4, drop, sparse_routes=True)
    assert_same_routes(ours, theirs)
    assert bool((ours.indices >= 0).sum() < ours.counts.sum()) == drop


def test_topkgating_padding_takes_no_route_and_no_slot():
    logits = routed_logits(num_experts=6)
    used = torch.ones(40)
    used[::3] = 0
    l_aux, cap, idx, loc, gates, counts = gating.topkgating(logits, 200, used, k=3)
    assert (idx[:, ::3] == -1).all() and (idx[:, used.bool()] >= 0).all()
    assert (gates[:, ::3] == 0).all() and counts.sum() == 3 * used.sum()
    for e in range(6):
        slots = sorted(loc[idx == e].tolist())
        assert slots == list(range(len(slots)))
    # over capacity, padding takes no slot: the kept routes are the most probable real ones
    _, _, idx, _, _, counts = gating.topkgating(logits, 5, used, k=3)
    assert (idx[:, ::3] == -1).all() and (idx >= 0).sum() == 6 * 5  # every expert full
    probs = F.softmax(logits, dim=1)
    for e in range(6):
        kept = (idx == e).any(0)
        assert kept.sum() == 5
        ranked = probs[:, e].masked_fill(
            ~(used.bool() & (torch.topk(probs, 3).indices == e).any(1)), -1
        )
        assert set(torch.nonzero(kept).flatten().tolist()) == set(ranked.topk(5).indices.tolist())


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
def test_topk_padding_tokens_take_no_capacity(fast_dispatch):
    layer = make_layer(top_k=3, capacity_factor=1.0)
    layer.fast_dispatch = fast_dispatch
    # 8 tokens, capacity ceil(8 / 4 * 3) = 6; all prefer expert 0, then 1, then 2. The
    # first four are padding: unmasked, the most probable of them keep slots over real tokens.
    x = tokens_for([0] * 8)
    x[:4, 0, 0] = 2.0  # padding more probable for expert 0 than the real tokens
    x[:, 0, 1], x[:, 0, 2] = 0.6, 0.4
    pad = torch.tensor([[True] * 4 + [False] * 4])
    y = layer(x, pad)
    p = F.softmax(x.reshape(-1, C) @ (torch.eye(E) * 3).t(), dim=-1)[4]
    expected = (p[0] * 1 + p[1] * 2 + p[2] * 3) / (p[0] + p[1] + p[2]) * x[4, 0]
    for i in range(4, 8):
        torch.testing.assert_close(y[i, 0], expected)
    assert (y[:4] == 0).all()
    assert layer.exp_counts.tolist() == [4, 4, 4, 0]


@pytest.mark.parametrize("k", [1, 2])
def test_no_drop_routes_are_deepspeeds_bit_for_bit(k):
    torch.manual_seed(0)
    logits = torch.randn(37, 6)
    logits[3] = logits[4]  # a tie between tokens
    logits[5, :2] = 1.5  # a tie between experts: the first wins
    if k == 1:
        l_aux, cap, _, idx, _, gates, counts = sharded_moe.top1gating(
            logits.clone(), 1.0, 0, None, None, drop_tokens=False, use_rts=False, sparse_routes=True
        )
    else:
        l_aux, cap, _, idx, _, gates, counts = sharded_moe.top2gating(
            logits.clone(),
            1.0,
            0,
            drop_tokens=False,
            top2_2nd_expert_sampling=False,
            sparse_routes=True,
        )
    routes = gating.no_drop_routes(logits, k)
    i2, g2, a2, c2 = routes.indices, routes.gates, routes.l_aux, routes.counts
    assert torch.equal(i2.to(idx.dtype), idx) and torch.equal(g2, gates)
    assert torch.equal(a2, l_aux) and torch.equal(c2, counts)
    assert int(cap) == int(counts.max())  # DeepSpeed's capacity: nothing dropped
    assert routes.capacity == int(cap) and routes.locations is None
    # the gating function without a capacity: the same routes
    full = gating.GATING[gating.policy_for(k)](logits.clone(), None, k=k)
    assert torch.equal(full.indices, idx) and torch.equal(full.gates, gates)


# -- the gate module --------------------------------------------------------------------


def test_gate_is_deepspeeds_topkgate_with_its_router():
    from deepspeed.moe.layer import MoE

    opts = MoEOptions(
        sides=frozenset({"enc"}),
        num_experts=E,
        top_k=2,
        capacity_factor=1.5,
        eval_capacity_factor=1.75,
        min_capacity=2,
        drop_tokens=False,
        eval_drop_tokens=True,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    torch.manual_seed(5)
    ours = ds_moe.build_moe(C, ExpertFFN(C, 8), opts, "encoder.0", 1)
    after_ours = torch.get_rng_state()
    torch.manual_seed(5)
    theirs = MoE(C, ExpertFFN(C, 8), num_experts=E, k=2)
    assert torch.equal(after_ours, torch.get_rng_state()), "building the gate drew random numbers"
    gate = ds_moe.moe_gate(ours)
    assert isinstance(gate, gating.Gate) and isinstance(gate, sharded_moe.TopKGate)
    gate_params = [n for n, _ in ours.named_parameters() if "gate" in n]
    assert gate_params == ["deepspeed_moe.gate.wg.weight"]
    assert torch.equal(gate.wg.weight, theirs.deepspeed_moe.gate.wg.weight)
    assert (gate.k, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity) == (
        2,
        1.5,
        1.75,
        2,
    )
    assert (
        gate.drop_tokens,
        gate.eval_drop_tokens,
        gate.use_rts,
        gate.top2_2nd_expert_sampling,
        gate.noisy_gate_policy,
        gate.policy,
    ) == (False, True, False, False, None, "top2")
    assert gate.drops() is False and gate.eval().drops() is True
    assert gate.capacity(100) == gating.expert_capacity(100, E, 1.75, 2, 2)


def public_state(module):
    """A module's own attributes, without torch's internals (parameters, hooks, mode)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "no_drop"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("path", ["local", "buffers", "agreed", "agreed_exact_fit"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_forward_changes_no_gate_attribute_and_nothing_in_deepspeed(k, path, mode, drop):
    train = mode == "train"
    # drops in this mode only: a gate rewritten for the mode would show
    layer = make_layer(
        top_k=k,
        capacity_factor=0.5,
        drop_tokens=drop == train,
        eval_drop_tokens=drop != train,
        use_rts=True,
        top2_2nd_expert_sampling=True,
    )
    gate = ds_moe.moe_gate(layer.moe)
    built, module = public_state(gate), dict(vars(sharded_moe))

    def unchanged():
        now = dict(vars(sharded_moe))
        return (
            public_state(gate) == built
            and now.keys() == module.keys()
            and all(now[n] is v for n, v in module.items())
        )

    during = []
    gate.register_forward_pre_hook(lambda *_: during.append(unchanged()))
    layer.train(train)
    layer.fast_dispatch = path == "local"
    x = tokens_for([0, 1, 0, 2, 0, 3, 0, 0])
    pad = torch.tensor([[False] * 6 + [True] * 2])
    if path.startswith("agreed"):  # an expert-parallel forward's capacity, in one process
        layer.agreed_tokens = 11
        layer.exact_fit, layer.exact_fit_min_tokens = path == "agreed_exact_fit", 0
    assert layer.uses_local_dispatch() == (path == "local")
    layer(x, pad)
    assert unchanged() and all(during)
    assert during or (path == "local" and mode == "eval" and not drop and k <= 2)


def test_a_policy_in_the_table_routes_the_layer(monkeypatch):
    """Adding a gating policy: a function in the table, named by the gate."""

    def last_expert(logits, capacity=None, used=None, *, k, **_):
        S, num_experts = logits.shape
        idx = torch.full((1, S), num_experts - 1, dtype=torch.int32)
        return gating.Routes(
            logits.sum() * 0,
            S,
            idx,
            torch.arange(S).unsqueeze(0).int(),
            torch.ones(1, S),
            torch.bincount(idx[0], minlength=num_experts),
        )

    monkeypatch.setattr(
        gating, "GATING", MappingProxyType({**gating.GATING, "last_expert": last_expert})
    )
    for fast_dispatch in (True, False):
        layer = make_layer(top_k=1)
        layer.fast_dispatch = fast_dispatch
        old = ds_moe.moe_gate(layer.moe)
        layer.moe.deepspeed_moe.gate = gating.Gate(old.wg, k=1, policy="last_expert")
        x = tokens_for([0, 1, 2])
        torch.testing.assert_close(layer(x), x * E)
        assert layer.exp_counts.tolist() == [0, 0, 0, 3]
    with pytest.raises(ValueError, match="unknown gating policy 'nope'"):
        gating.Gate(old.wg, policy="nope")


def reference_moe(layer):
    """The layer's DeepSpeed ``MoE`` with DeepSpeed's own gate (same router weight)."""
    from deepspeed.moe.sharded_moe import TopKGate

    o = layer.opts
    ref = copy.deepcopy(layer.moe)
    with torch.random.fork_rng(devices=[]):
        gate = TopKGate(
            ref.deepspeed_moe.gate.wg.in_features,
            o.num_experts,
            o.top_k,
            o.capacity_factor,
            o.eval_capacity_factor,
            o.min_capacity,
            o.noisy_gate_policy,
            o.drop_tokens,
            o.use_rts,
            None,
            o.top2_2nd_expert_sampling,
        )
    gate.wg = ref.deepspeed_moe.gate.wg
    ref.deepspeed_moe.gate = gate
    return ref


@pytest.mark.parametrize("residual", [False, True], ids=["moe", "residual"])
@pytest.mark.parametrize(
    "k,noise", [(1, None), (1, "RSample"), (1, "Jitter"), (2, None), (3, None)]
)
def test_buffer_path_is_deepspeeds_moe_forward_bit_for_bit(k, noise, residual):
    """Training, tokens dropped: the buffer path (DeepSpeed's dispatch helpers called by
    MoEFeedForward, then the PR-MoE mix) gives DeepSpeed's ``MoE.forward`` values exactly."""
    opts = MoEOptions(
        sides=frozenset({"enc"}),
        num_experts=E,
        top_k=k,
        capacity_factor=0.5,
        min_capacity=2,
        noisy_gate_policy=noise,
        use_residual=residual,
    )
    torch.manual_seed(0)
    layer = MoEFeedForward(16, ExpertFFN(16, 24), opts, "encoder.0", seed=3)
    layer.fast_dispatch = False
    ref = reference_moe(layer)
    x = torch.randn(13, 3, 16)
    results = []
    for run in (lambda t: layer(t.view(13, 3, 16)).view(-1, 16), lambda t: ref(t)[0]):
        t = x.reshape(-1, 16).clone().requires_grad_()
        torch.manual_seed(11)
        y = run(t)
        mod = layer.moe if len(results) == 0 else ref
        aux, counts = mod.deepspeed_moe.l_aux, mod.deepspeed_moe.exp_counts
        mod.zero_grad()
        (y.pow(2).sum() + aux).backward()
        results.append(
            (
                y.detach(),
                aux.detach(),
                counts,
                t.grad,
                {n: p.grad for n, p in mod.named_parameters()},
            )
        )
    (y, aux, counts, gx, grads), (y_ds, aux_ds, counts_ds, gx_ds, grads_ds) = results
    assert int(counts.max()) > gating.expert_capacity(39, E, 0.5, k, 2)  # tokens were dropped
    assert torch.equal(y, y_ds) and torch.equal(aux, aux_ds) and torch.equal(counts, counts_ds)
    assert torch.equal(gx, gx_ds)
    assert grads.keys() == grads_ds.keys()
    for n, g in grads_ds.items():
        assert (g is None and grads[n] is None) or torch.equal(grads[n], g), n


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
def test_counts_and_slots_stay_exact_in_bfloat16(fast_dispatch):
    """bf16 holds integers exactly up to 256 only: more real tokens than that on one
    expert, with padding, still get one slot each and exact counts."""
    layer = make_layer(top_k=1, capacity_factor=4.0)  # capacity ceil(600 / 4 * 4) = 600
    layer.fast_dispatch = fast_dispatch
    ref = copy.deepcopy(layer)
    x = tokens_for([0] * 600)
    pad = torch.tensor([[True] * 10 + [False] * 590])
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16), pad)
    assert layer.exp_counts.tolist() == [590, 0, 0, 0]
    assert (y[10:].float().abs().sum(-1) > 0).all() and (y[:10] == 0).all()
    torch.testing.assert_close(y.float(), ref(x, pad), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["local", "buffers"])
def test_fewer_tokens_than_min_capacity_when_dropping(fast_dispatch):
    """DeepSpeed's top-1 gate asserts tokens >= min_capacity; ours routes one token
    into a capacity of min_capacity, with no zero rows added (they would count)."""
    opts = MoEOptions(
        sides=frozenset({"dec"}), num_experts=E, min_capacity=4, eval_drop_tokens=True
    )
    layer = MoEFeedForward(C, ExpertFFN(C, 8), opts, "decoder.0", seed=1)
    layer.fast_dispatch = fast_dispatch
    layer.collect_stats = True
    for train in (True, False):
        layer.train(train)
        y = layer(torch.randn(1, 1, C))
        assert y.shape == (1, 1, C) and torch.isfinite(y).all() and (y != 0).any()
        assert layer.exp_counts.sum() == 1 and layer.stats["dropped"] == 0


@pytest.mark.parametrize("k,noise", [(1, "RSample"), (1, "Jitter"), (2, None)])
def test_exact_fit_sizes_the_buffers_for_the_noisy_routes_taken(k, noise):
    """Expert parallelism without dropping, in training: the agreed capacity is the
    busiest count of the routes the gate takes (noise and second-expert sampling
    included), so no route is dropped and the output is the local path's."""
    layer = make_layer(
        top_k=k, drop_tokens=False, noisy_gate_policy=noise, top2_2nd_expert_sampling=True
    )
    layer.collect_stats = True
    local = copy.deepcopy(layer)
    # without noise, balanced routes: token i's first choice i % E, its second i + 1;
    # the other logits are close enough for the noise to unbalance them
    x = torch.full((96, 2, C), 0.99)
    for i in range(96):
        x[i, :, i % E], x[i, :, (i + 1) % E] = 1.0, 0.995
    layer.agreed_tokens = x.shape[0] * x.shape[1]  # the buffers path, in one process
    layer.exact_fit, layer.exact_fit_min_tokens = True, 0
    outs = []
    for mdl in (layer, local):
        torch.manual_seed(3)
        outs.append(mdl(x))
    assert layer.stats["dropped"] == 0 and layer.exp_counts.sum() == k * x.shape[0] * x.shape[1]
    assert (outs[0].abs().sum(-1) > 0).all(), "a route was dropped"
    torch.testing.assert_close(outs[0], outs[1])
