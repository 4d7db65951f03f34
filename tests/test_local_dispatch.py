# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The local dispatch (each expert on exactly its tokens, in one process) against
the buffer path (DeepSpeed's ``experts x capacity`` dispatch, as in ``MOELayer``,
which tests/test_gating.py checks against DeepSpeed's ``MoE.forward``): same routes,
same dropped tokens, same gate loss and counts, same outputs and gradients (up to
the rounding of differently sized matrix products), same translations. No timing
here: see scripts/bench_perf.py. The inference routes themselves
(``gating.no_drop_routes``) are checked against DeepSpeed's in tests/test_gating.py."""

import copy

import pytest
import torch

from user import ds_moe
from user.modules.moe_ffn import ExpertFFN, MoEFeedForward
from user.moe_options import MoEOptions

from moe_helpers import build, sample_batch

D, E = 16, 4


def pair(**kw):
    """The same MoE layer twice: the buffer path and the local path."""
    opts = MoEOptions(
        sides=frozenset({"enc"}),
        num_experts=E,
        min_capacity=4,
        top2_2nd_expert_sampling=False,
        **kw,
    )
    torch.manual_seed(0)
    ds = MoEFeedForward(D, ExpertFFN(D, 24), opts, "encoder.0", seed=3)
    local = copy.deepcopy(ds)
    ds.fast_dispatch, local.fast_dispatch = False, True
    return ds, local


def run(layer, x, pad, train):
    layer.train(train)
    layer.collect_stats = True
    x = x.clone().requires_grad_(True)
    torch.manual_seed(11)  # random token selection draws the same numbers on both paths
    y = layer(x, pad)
    (y.pow(2).sum() + layer.l_aux).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, dict(layer.stats)


CASES = [
    # (options, train, padding)
    (dict(top_k=1), True, False),
    (dict(top_k=1), True, True),  # padding takes no capacity
    (dict(top_k=1, capacity_factor=0.5), True, True),  # tokens dropped
    (dict(top_k=1, noisy_gate_policy="RSample"), True, False),
    (dict(top_k=1, noisy_gate_policy="Jitter"), True, True),
    (dict(top_k=1, drop_tokens=False), True, False),
    (dict(top_k=1), False, True),  # inference: no dropping
    (dict(top_k=1, eval_drop_tokens=True, eval_capacity_factor=0.5), False, False),
    (dict(top_k=2), True, False),
    (dict(top_k=2, capacity_factor=0.5), True, False),
    (dict(top_k=2), False, False),
    (dict(top_k=2, drop_tokens=False), True, True),
    (dict(top_k=3), True, False),
    (dict(top_k=3, capacity_factor=0.5), True, True),  # padding takes no capacity
    (dict(top_k=3), False, False),
]


@pytest.mark.parametrize(
    "opts,train,padded",
    CASES,
    ids=[f"{o}-{'train' if t else 'eval'}{'-pad' if p else ''}" for o, t, p in CASES],
)
def test_local_path_equals_deepspeeds(opts, train, padded):
    ds, local = pair(**opts)
    assert local.uses_local_dispatch() and not ds.uses_local_dispatch()
    x = torch.randn(23, 3, D)
    pad = None
    if padded:
        pad = torch.zeros(3, 23, dtype=torch.bool)
        pad[1, 15:] = True
        pad[2, 5:] = True
    y_ds, gx_ds, g_ds, st_ds = run(ds, x, pad, train)
    y, gx, g, st = run(local, x, pad, train)
    # routing: identical counts, gate loss, dropped tokens
    assert torch.equal(local.exp_counts, ds.exp_counts)
    assert torch.equal(local.l_aux, ds.l_aux)
    assert torch.equal(y.abs().sum(-1) == 0, y_ds.abs().sum(-1) == 0)
    assert {k: v for k, v in st.items() if k != "counts"} == {
        k: v for k, v in st_ds.items() if k != "counts"
    }
    # values: the same arithmetic per token, products of other shapes
    torch.testing.assert_close(y, y_ds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ds, rtol=1e-5, atol=1e-6)
    for name, grad in g_ds.items():
        # an expert that got no token has a zero gradient on both paths, not none
        assert g[name] is not None, name
        torch.testing.assert_close(g[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_local_path_only_where_every_expert_is_local():
    ds, local = pair(top_k=1)
    local.agreed_tokens = 10  # expert-parallel forward: the buffers and all-to-alls
    assert not local.uses_local_dispatch()
    opts = MoEOptions(sides=frozenset({"enc"}), num_experts=E, ep_size=2)
    ep = ds_moe.build_moe(D, ExpertFFN(D, 24), opts, "encoder.0", 1)
    assert not ds_moe.local_dispatch_supported(ep)
    residual = ds_moe.build_moe(
        D,
        ExpertFFN(D, 24),
        MoEOptions(sides=frozenset({"enc"}), num_experts=E, use_residual=True),
        "encoder.0",
        1,
    )
    assert not ds_moe.local_dispatch_supported(residual)


def test_hooked_experts_are_called_as_modules():
    ds, local = pair(top_k=1)
    calls = []
    expert = ds_moe.local_experts(local.moe)[0]
    assert expert.plain()
    expert.fc1.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    assert not expert.plain()
    local.eval()(torch.randn(8, 2, D))
    assert calls, "the hook did not run"


def test_model_forward_and_translations_match(tiny_data):
    # fmt: off
    task, model = build(tiny_data, "transformer_ds_moe", "--deepspeed_moe", "enc,dec",
                        "--num-experts", "4", "--moe-freq", "1")
    # fmt: on
    ref = copy.deepcopy(model)
    for m in ref.moe_ffn_layers().values():
        m.fast_dispatch = False
    sample = sample_batch(task, 6)
    for train in (True, False):
        outs = []
        for mdl in (model, ref):
            mdl.train(train)
            torch.manual_seed(5)
            with torch.no_grad():
                x, extra = mdl(**sample["net_input"])
            outs.append((x, extra["experts_gate_loss"]))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(outs[0][1], outs[1][1])
    from argparse import Namespace

    gen_args = Namespace(beam=3, max_len_a=0, max_len_b=8, min_len=1)
    hyps = []
    for mdl in (model, ref):
        gen = task.build_generator([mdl.eval()], gen_args)
        with torch.no_grad():
            hyps.append([h[0]["tokens"].tolist() for h in task.inference_step(gen, [mdl], sample)])
    assert hyps[0] == hyps[1]
