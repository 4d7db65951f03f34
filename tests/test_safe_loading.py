# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Checkpoints are data, never code: every checkpoint read (fairseq's --path,
--restore-file, hub; --upcycle-from, reshard, shards) goes through one weights-only
loader that allows what fairseq checkpoints hold; a file that would run code is
refused with one line before anything of it runs; pruning reads shard tokens from
the pickle's opcodes without running them; a legacy pickle loads only when the user
says to trust it."""

import logging
import os
import zipfile

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils

from user.checkpoint import format as fmt
from user.checkpoint import io as ckpt_io
from user.checkpoint import reading

from conftest import USER_DIR, run_cli
from test_cli import MODEL

TRUST = "FAIRSEQ_MOE_TRUST_PICKLE"


class RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Legacy:
    """A harmless class that no allow-list names (as old pickled checkpoints hold)."""

    def __init__(self, value):
        self.value = value


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)  # a file this test wrote


@pytest.fixture
def crafted(trained_once, tmp_path):
    """``(path, marker)``: a real trained checkpoint plus one entry whose unpickling
    would create ``marker``."""
    marker = tmp_path / "MARKER"
    state = load_state(trained_once / "checkpoint_last.pt")
    state["extra_state"]["surprise"] = RunsCommand(f"touch {marker}")
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    return path, marker


def _refusal(error, path):
    msg = str(error)
    assert "\n" not in msg and str(path) in msg, msg
    assert f"{os.system.__module__}.system" in msg and f"{TRUST}=1" in msg, msg


@pytest.mark.parametrize(
    "load",
    [ckpt_io.read_checkpoint, ckpt_io.load_consolidated, checkpoint_utils.load_checkpoint_to_cpu],
    ids=["read_checkpoint", "load_consolidated", "fairseq"],
)
def test_a_crafted_checkpoint_is_refused_before_it_runs(crafted, load, monkeypatch):
    monkeypatch.delenv(TRUST, raising=False)
    path, marker = crafted
    with pytest.raises(fmt.ExpertCheckpointError) as e:
        load(str(path))
    assert not marker.exists(), "the file's code ran"
    _refusal(e.value, path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "command", ["generate --path", "train --restore-file", "upcycle", "reshard"]
)
def test_no_command_runs_a_crafted_checkpoint(tiny_data, crafted, tmp_path, command):
    path, marker = crafted
    db, save = tiny_data["databin"], tmp_path / "save"
    train = ["python", USER_DIR / "train.py", db, *MODEL, "--save-dir", save, "--max-update", "3"]
    # fmt: off
    argv = {
        "generate --path": ["python", USER_DIR / "generate.py", db, "--path", path,
                            "--gen-subset", "valid", "--num-workers", "0", "--cpu"],
        "train --restore-file": [*train, "--restore-file", path],
        "upcycle": [*train, "--upcycle-from", path],
        "reshard": ["python", "-m", "user.reshard", path, tmp_path / "out.pt", "--ep-size", "1"],
    }[command]
    # fmt: on
    proc = run_cli(argv, check=False)
    assert not marker.exists(), "the file's code ran"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: " in last
    _refusal(last, path)
    assert not (tmp_path / "out.pt").exists()


def _shared_file(trained_once, path, token):
    """A real checkpoint naming the expert shards ``token``; the token string is also
    pickled earlier in the file, so the record refers to it through the pickle's memo."""
    state = load_state(trained_once / "checkpoint_last.pt")
    state["extra_state"]["first"] = token
    state["extra_state"][fmt.SHARD_KEY] = fmt.shard_info(token, 2, 4, 2, ["a", "token"])
    torch.save(state, path)


def test_pruning_reads_tokens_without_running_any_pickle(trained_once, crafted, tmp_path, caplog):
    _, marker = crafted  # crafted.pt sits in the save dir and names no shards
    token = "-".join(["u2", "abc"])  # one str object, pickled twice
    _shared_file(trained_once, tmp_path / "checkpoint_last.pt", token)
    assert reading.shard_token(str(tmp_path / "checkpoint_last.pt")) == token
    for t in (token, "u1-old", "u3-new"):
        for r in range(2):
            torch.save({}, ckpt_io.shard_file(str(tmp_path), t, r, 2))
    removed = ckpt_io.prune_shards(str(tmp_path), keep=["u3-new"])
    assert not marker.exists(), "pruning ran a checkpoint's code"
    assert sorted(os.path.basename(p) for p in removed) == [
        "experts.u1-old.0-of-2.pt",
        "experts.u1-old.1-of-2.pt",
    ]
    # a file it cannot read: every shard is kept, and the log says why
    (tmp_path / "checkpoint_9.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert ckpt_io.prune_shards(str(tmp_path)) == []
    assert len(list(tmp_path.glob("experts.*.pt"))) == 4
    assert any("checkpoint_9.pt" in r.getMessage() for r in caplog.records)


def _renamed_globals(path, old: bytes, new: bytes) -> None:
    """Rewrite the module names a torch zip file's pickle refers to (as an older
    library version would have written them)."""
    with zipfile.ZipFile(path) as z:
        records = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in records:
            z.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


def test_what_fairseq_checkpoints_hold_loads_without_trust(trained_once, tmp_path, monkeypatch):
    """The plugin's own checkpoints (an argparse.Namespace in cfg) and fairseq's
    --eval-bleu metrics (numpy arrays of n-gram counts), also as numpy 1.x named them."""
    monkeypatch.delenv(TRUST, raising=False)
    state = load_state(trained_once / "checkpoint_last.pt")
    counts = np.array([12, 7, 3, 1])  # int64 in one process
    totals = np.array([20.0, 16.0, 12.0, 8.0])  # float64: summed over processes (all-reduce)
    for name, value in (("_bleu_counts", counts), ("_bleu_totals", totals)):
        meter = {"val": value, "sum": value, "count": 1, "round": None}
        state["extra_state"]["metrics"]["valid"].append((10, name, "AverageMeter", meter))
    path = tmp_path / "checkpoint_best.pt"
    torch.save(state, path)
    _renamed_globals(path, b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    loaded = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert loaded["cfg"]["model"].arch == "transformer_ds_moe_tiny"
    assert np.array_equal(loaded["extra_state"]["metrics"]["valid"][-2][3]["sum"], counts)
    assert np.array_equal(loaded["extra_state"]["metrics"]["valid"][-1][3]["sum"], totals)
    assert ckpt_io.read_checkpoint(str(path))["model"].keys() == state["model"].keys()


def test_a_legacy_pickle_loads_only_when_trusted_and_says_so(tmp_path, monkeypatch, caplog):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra_state": {"meters": Legacy(3)}}, path)
    monkeypatch.delenv(TRUST, raising=False)
    with pytest.raises(fmt.ExpertCheckpointError, match=f"{Legacy.__module__}.Legacy"):
        ckpt_io.read_checkpoint(str(path))
    monkeypatch.setenv(TRUST, "1")
    with caplog.at_level(logging.WARNING):
        state = ckpt_io.read_checkpoint(str(path))
    assert isinstance(state["extra_state"]["meters"], Legacy)
    assert state["extra_state"]["meters"].value == 3
    (warning,) = [r.getMessage() for r in caplog.records if TRUST in r.getMessage()]
    assert str(path) in warning and "run any code" in warning


def test_only_a_damaged_file_is_called_damaged(tmp_path, monkeypatch):
    """A failure that is not about the file (a changed signature, memory) keeps its own
    type; damaged files of every kind are one kind (named "truncated or corrupt")."""
    good = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(3)}}, good)
    data = good.read_bytes()
    for i, damaged in enumerate((b"text\n", data[: len(data) // 2], os.urandom(2000), b"")):
        path = tmp_path / f"bad{i}.pt"
        path.write_bytes(damaged)
        with pytest.raises(fmt.ExpertCheckpointError, match="truncated or corrupt"):
            ckpt_io.read_checkpoint(str(path), mmap=True)

    def changed(*args, **kwargs):
        raise TypeError("load() got an unexpected keyword argument 'mmap'")

    monkeypatch.setattr(torch, "load", changed)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ckpt_io.read_checkpoint(str(good))


def test_a_legacy_format_file_is_read_with_mmap_asked(tmp_path):
    """torch maps only zip checkpoints: a file in torch's pre-1.6 format is read plainly."""
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    assert ckpt_io.read_checkpoint(str(path), mmap=True)["model"]["w"].sum() == 3
