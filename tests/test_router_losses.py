# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The router z-loss (``--moe-z-loss``), expert output masking (``--moe-eom``) and
expert dropout (``--moe-expert-dropout``): values checked by hand, on the buffer path
and the local path, in training and in evaluation. The criterion's side is in
tests/test_criterion.py, expert parallelism in tests/test_expert_parallel.py."""

import copy
import math

import pytest
import torch

from user.modules import gating
from user.moe_options import MoEOptions

from moe_helpers import C, build, hand_checkable_layer, sample_batch

PATHS = pytest.mark.parametrize("fast_dispatch", [False, True], ids=["buffers", "local"])


def make_layer(fast_dispatch, **kw):
    """tests/moe_helpers.py's hand-checkable layer on one dispatch path."""
    return hand_checkable_layer(fast_dispatch, **kw)


# --------------------------------------------------------------------------- z-loss


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-5.0, 0.0, 5.0, 0.0]])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert gating.router_z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 3)
    # padding is left out of the mean
    used = torch.tensor([1, 0, 1])
    assert gating.router_z_loss(logits, used).item() == pytest.approx(
        (lse[0] ** 2 + lse[2] ** 2) / 2
    )
    assert gating.router_z_loss(logits[:0]).item() == 0.0  # no token, no NaN
    # a non-finite padding row stays out of the mean
    inf = torch.tensor([[0.0, 0.0], [float("inf"), 0.0]])
    assert gating.router_z_loss(inf, torch.tensor([1, 0])).item() == pytest.approx(math.log(2) ** 2)


@PATHS
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_layer_z_loss_is_the_mean_squared_logsumexp_of_its_router_logits(fast_dispatch, k, train):
    layer = make_layer(fast_dispatch, top_k=k, z_loss=True).train(train)
    layer.collect_stats = not train  # eval: a validation forward, as the model marks it
    x = torch.rand(6, 2, C) + 0.1  # T x B x C
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True  # the second sentence is 4 tokens long
    layer(x, pad)
    logits = 3 * x  # the router: 3 * identity
    real = ~pad.t()  # T x B
    want = (torch.logsumexp(logits, dim=-1)[real] ** 2).mean()
    torch.testing.assert_close(layer.z_loss, want)
    assert layer.l_aux is not None


@PATHS
def test_without_the_flag_or_in_decoding_there_is_no_z_loss(fast_dispatch):
    layer = make_layer(fast_dispatch, top_k=1)
    layer(torch.rand(5, 1, C))
    assert layer.z_loss is None
    # decoding (eval, no statistics collected) spends nothing on it
    layer = make_layer(fast_dispatch, top_k=1, z_loss=True).eval()
    layer(torch.rand(5, 1, C))
    assert layer.z_loss is None


def test_model_z_loss_reaches_the_routers_only(tiny_data):
    # fmt: off
    task, model = build(tiny_data, "transformer_ds_moe_tiny", "--deepspeed_moe", "enc,dec",
                        "--num-experts", "4", "--moe-z-loss")
    # fmt: on
    batch = sample_batch(task)
    losses = model.get_losses(model(**batch["net_input"]), batch)
    assert set(losses) == {"experts_gate_loss", "experts_z_loss"}
    layers = model.moe_ffn_layers()
    torch.testing.assert_close(
        losses["experts_z_loss"], torch.stack([m.z_loss for m in layers.values()]).sum()
    )
    losses["experts_z_loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    routers = [n for n in grads if ".gate.wg." in n]
    assert len(routers) == 2 and all(grads[n].abs().sum() > 0 for n in routers)
    # what only the output depends on (the last decoder layer's experts) gets nothing
    above = [n for n in grads if n.startswith("decoder.layers.1.") and "deepspeed_experts" in n]
    assert above and all(grads[n] is None for n in above + ["decoder.output_projection.weight"])
    stats = model.routing_stats()
    assert all(stats[n]["z"] == pytest.approx(float(m.z_loss)) for n, m in layers.items())


# --------------------------------------------------------------------------- EOM


def _eom_pair(fast_dispatch, k, p):
    plain = make_layer(fast_dispatch, top_k=k, drop_tokens=False)
    masked = copy.deepcopy(plain)
    masked.opts = MoEOptions(**{**plain.opts.__dict__, "eom": p})
    return plain, masked


@PATHS
@pytest.mark.parametrize("k,p", [(1, 0.3), (2, 0.5)])
def test_eom_drops_a_share_p_of_routes_in_training_only(fast_dispatch, k, p):
    plain, masked = _eom_pair(fast_dispatch, k, p)
    x = torch.rand(500, 4, C) + 0.1  # every expert output is positive
    want = plain.train()(x)
    torch.manual_seed(0)
    got = masked.train()(x)
    zero = (got == 0).all(-1)
    # a token loses its whole output when all its k routes are dropped: p ** k
    share = zero.float().mean().item()
    assert abs(share - p**k) < 5 * math.sqrt(p**k * (1 - p**k) / zero.numel())
    if k == 1:  # the kept tokens' outputs are scaled by 1 / (1 - p)
        torch.testing.assert_close(got[~zero], want[~zero] / (1 - p))
    # evaluation and generation: the layer without masking, bit for bit
    torch.testing.assert_close(masked.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_eom_off_draws_no_random_number():
    layer = make_layer(True, top_k=1)
    torch.manual_seed(0)
    layer.train()(torch.rand(7, 2, C))
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(7, 2, C)
    assert torch.equal(torch.rand(1), after)


# --------------------------------------------------------------------------- expert dropout


@pytest.mark.parametrize("side,residual", [("enc", []), ("dec", ["--moe-use-residual"])])
def test_expert_dropout_replaces_activation_dropout_in_experts_only(tiny_data, side, residual):
    # fmt: off
    flags = ["--deepspeed_moe", side, "--num-experts", "4", "--dropout", "0",
             "--attention-dropout", "0", "--activation-dropout", "0.1", *residual]
    # fmt: on
    task, plain = build(tiny_data, "transformer_ds_moe_tiny", *flags)
    _, dropped = build(tiny_data, "transformer_ds_moe_tiny", *flags, "--moe-expert-dropout", "0.5")
    for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()):
        assert torch.equal(a, b)  # dropout has no parameters: the same model
    rates = {n: m.p for n, m in dropped.named_modules() if n.endswith("activation_dropout_module")}
    experts = {n: r for n, r in rates.items() if ".deepspeed_experts." in n}
    assert experts and set(experts.values()) == {0.5}
    assert set(r for n, r in rates.items() if n not in experts) == {0.1}  # dense FFNs
    if residual:  # PR-MoE's dense MLP beside the experts is a dense FFN too
        assert any(n.endswith(".moe.mlp.activation_dropout_module") for n in rates)

    batch = sample_batch(task)

    def out(model, train):
        torch.manual_seed(3)
        return model.train(train)(**batch["net_input"])[0]

    assert not torch.equal(out(plain, True), out(dropped, True))
    torch.testing.assert_close(out(plain, False), out(dropped, False), rtol=0, atol=0)
