# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Sparse upcycling: the state mapping by hand, the step-0 equalities
(top-2 = dense, top-1 = dense x gate probability), and the CLI flag."""

import pytest
import torch
import torch.nn.functional as F

from user.checkpoint.upcycle import UpcycleError, upcycle_state

from conftest import USER_DIR, run_cli
from moe_helpers import build, sample_batch

X = "enc.layers.0.moe_ffn.moe"


def test_state_mapping_copies_the_dense_ffn_into_every_expert_and_keeps_the_router():
    dense = {
        "emb": torch.ones(2),
        "enc.layers.0.fc1.weight": torch.full((3, 2), 2.0),
        "enc.layers.0.fc2.bias": torch.full((2,), 3.0),
    }
    moe = {"emb": torch.zeros(2), f"{X}.deepspeed_moe.gate.wg.weight": torch.full((4, 2), 5.0)}
    for i in range(4):
        moe[f"{X}.deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight"] = torch.zeros(3, 2)
        moe[f"{X}.deepspeed_moe.experts.deepspeed_experts.{i}.fc2.bias"] = torch.zeros(2)
    out, fresh = upcycle_state(dense, moe)
    assert fresh == [f"{X}.deepspeed_moe.gate.wg.weight"]
    assert torch.equal(out[fresh[0]], moe[fresh[0]])
    assert torch.equal(out["emb"], dense["emb"])
    for i in range(4):
        assert torch.equal(
            out[f"{X}.deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight"],
            dense["enc.layers.0.fc1.weight"],
        )


def test_state_mapping_refuses_another_architecture():
    moe = {f"{X}.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight": torch.zeros(3, 2)}
    with pytest.raises(UpcycleError, match="shape"):
        upcycle_state({"enc.layers.0.fc1.weight": torch.zeros(4, 2)}, moe)
    with pytest.raises(UpcycleError, match="has no enc.layers.0.fc1.weight"):
        upcycle_state({}, moe)


def _dense_and_upcycled(tiny_data, *moe_flags):
    _, dense = build(tiny_data, "transformer_ds_moe_tiny", "--dropout", "0", seed=1)
    # fmt: off
    task, moe = build(tiny_data, "transformer_ds_moe_tiny", "--dropout", "0", "--deepspeed_moe", "enc,dec",
                      "--num-experts", "4", "--moe-freq", "1", *moe_flags, seed=2)
    # fmt: on
    state, fresh = upcycle_state(dense.state_dict(), moe.state_dict())
    assert len(fresh) == 4  # one router per MoE layer (2 encoder + 2 decoder)
    moe.load_state_dict(state)
    return task, dense.eval(), moe.eval()


def test_top2_upcycled_model_computes_the_dense_model(tiny_data):
    task, dense, moe = _dense_and_upcycled(tiny_data, "--top-k", "2")
    sample = sample_batch(task, 6)
    with torch.no_grad():
        want = dense(**sample["net_input"])[0]
        got = moe(**sample["net_input"])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_top1_upcycled_ffn_is_the_dense_ffn_times_the_gate_probability(tiny_data):
    _, dense, moe = _dense_and_upcycled(tiny_data, "--top-k", "1")
    layer, ffn = dense.encoder.layers[0], moe.encoder.layers[0].moe_ffn
    x = torch.randn(5, 3, 16)  # T x B x C
    with torch.no_grad():
        got = ffn(x, None)
        prob = F.softmax(ffn.moe.deepspeed_moe.gate.wg(x.float()), dim=-1).max(-1).values  # T x B
        want = layer.fc2(F.relu(layer.fc1(x))) * prob.unsqueeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, layer.fc2(F.relu(layer.fc1(x))))  # the gate does scale it


# fmt: off
TRAIN = ["--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny",
         "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
         "--decoder-ffn-embed-dim", "24", "--encoder-layers", "1", "--decoder-layers", "1",
         "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "800", "--max-update", "2",
         "--num-workers", "0", "--no-epoch-checkpoints", "--log-format", "simple"]
# fmt: on
# fmt: off
MOE = ["--deepspeed_moe", "enc,dec", "--num-experts", "4", "--moe-freq", "1", "--criterion", "model_and_base"]
# fmt: on


@pytest.mark.timeout(300)
def test_cli_upcycles_and_refuses_a_dense_checkpoint_without_the_flag(tiny_data, tmp_path):
    db = tiny_data["databin"]
    run_cli(["python", USER_DIR / "train.py", db, *TRAIN, "--save-dir", tmp_path / "dense"])
    dense_ckpt = tmp_path / "dense" / "checkpoint_last.pt"
    proc = run_cli(
        [
            "python",
            USER_DIR / "train.py",
            db,
            *TRAIN,
            *MOE,
            "--save-dir",
            tmp_path / "moe",
            "--upcycle-from",
            dense_ckpt,
        ]
    )
    assert "upcycled from dense checkpoint" in proc.stdout + proc.stderr
    assert (tmp_path / "moe" / "checkpoint_last.pt").exists()

    # the dense run's own save dir holds a dense checkpoint_last.pt: resuming it as MoE is refused
    proc = run_cli(
        [
            "python",
            USER_DIR / "train.py",
            db,
            *TRAIN,
            *MOE,
            "--save-dir",
            tmp_path / "dense",
            "--max-update",
            "4",
        ],
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert "is a dense checkpoint" in err and "--upcycle-from" in err
    assert "Traceback" not in proc.stderr

    proc = run_cli(
        [
            "python",
            USER_DIR / "train.py",
            db,
            *TRAIN,
            *MOE,
            "--save-dir",
            tmp_path / "x",
            "--upcycle-from",
            tmp_path / "nope.pt",
        ],
        check=False,
    )
    assert (
        proc.returncode != 0 and "--upcycle-from" in proc.stderr and "no such file" in proc.stderr
    )
    assert not (tmp_path / "x").exists()
