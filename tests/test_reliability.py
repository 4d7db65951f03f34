# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Bad input is refused before any work with one clear line; damaged or
mismatched checkpoints are refused naming the file; fairseq's checkpoint
copies are atomic."""

import os

import pytest

from conftest import USER_DIR, run_cli, train_py
from test_cli import MODEL, losses_by_update


def refused(tiny_data, tmp_path, *args, data=None):
    save = tmp_path / "fresh"
    proc = run_cli(
        [
            "python",
            USER_DIR / "train.py",
            data or tiny_data["databin"],
            *args,
            "--save-dir",
            save,
            "--max-update",
            "2",
        ],
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not save.exists(), "nothing may be written"
    return last


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--arch", "transformer", "--deepspeed_moe", "enc"],
            "--deepspeed_moe needs a transformer_ds_moe_* architecture, not --arch transformer: use --arch transformer_ds_moe",
        ),
        ([*MODEL, "--fp16"], "--fp16 needs a CUDA GPU"),
        ([*MODEL, "--top-k", "5"], "--top-k 5 is out of range"),
        ([*MODEL, "-s", "en", "-t", "fr"], "--target-lang fr: "),
        (
            [*MODEL, "--restore-file", "checkpoint_9_99.pt"],
            "--restore-file checkpoint_9_99.pt: no such file, neither as given nor in --save-dir",
        ),
        (
            [a for a in MODEL if a not in ("--max-tokens", "800")],
            "give --max-tokens N or --batch-size N",
        ),
    ],
)
def test_bad_input_is_one_clear_line_before_any_work(tiny_data, tmp_path, args, message):
    assert message in refused(tiny_data, tmp_path, *args)


@pytest.mark.timeout(120)
def test_missing_data_directory(tiny_data, tmp_path):
    last = refused(tiny_data, tmp_path, *MODEL, data=tmp_path / "nope")
    assert "data directory" in last and "does not exist" in last


@pytest.mark.timeout(120)
def test_missing_later_shard_of_the_data_path(tiny_data, tmp_path):
    """fairseq reads shard 2 in epoch 2 only: checked before any work."""
    data = f"{tiny_data['databin']}:{tmp_path / 'nope'}"
    last = refused(tiny_data, tmp_path, *MODEL, data=data)
    assert f"data directory {tmp_path / 'nope'} (shard 2 of 2) does not exist" in last


@pytest.mark.timeout(120)
def test_corrupt_upcycle_source_is_refused_before_any_work(tiny_data, tmp_path):
    bad = tmp_path / "dense.pt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    last = refused(tiny_data, tmp_path, *MODEL, "--upcycle-from", bad)
    assert f"--upcycle-from: cannot read checkpoint {bad} (" in last and "corrupt" in last


def resume(tiny_data, save, *extra):
    return train_py(tiny_data["databin"], save, 4, *extra, check=False)


@pytest.mark.timeout(300)
def test_truncated_checkpoint_is_named_and_left_alone(tiny_data, trained_once, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    data = (trained_once / "checkpoint_last.pt").read_bytes()
    (save / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])
    proc = resume(tiny_data, save)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        "cannot read checkpoint" in last
        and "checkpoint_last.pt" in last
        and "--restore-file" in last
    )
    assert (save / "checkpoint_last.pt").stat().st_size == len(data) // 2, (
        "the file is kept for the user"
    )


@pytest.mark.timeout(300)
def test_following_the_corrupt_checkpoint_advice_resumes(tiny_data, trained_once, tmp_path):
    """The advice names the newest interval checkpoint by its full path; passed by its
    name only (as fairseq's docs spell it), it is found in --save-dir: training goes on
    from its update instead of from update 0."""
    save = tmp_path / "ckpt"
    save.mkdir()
    data = (trained_once / "checkpoint_last.pt").read_bytes()  # at update 2
    (save / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])
    (save / "checkpoint_1_2.pt").write_bytes(data)
    (save / "checkpoint_1_1.pt").write_bytes(data)  # older: not the one advised
    last = resume(tiny_data, save).stderr.strip().splitlines()[-1]
    assert f"use --restore-file {save / 'checkpoint_1_2.pt'} or move this file away" in last
    proc = resume(tiny_data, save, "--restore-file", "checkpoint_1_2.pt")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"loading {save / 'checkpoint_1_2.pt'}" in proc.stdout + proc.stderr
    assert sorted(losses_by_update(proc.stdout)) == [3, 4], "goes on from update 2"


@pytest.mark.timeout(300)
def test_checkpoint_with_another_number_of_experts(tiny_data, trained_once, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes((trained_once / "checkpoint_last.pt").read_bytes())
    proc = resume(tiny_data, save, "--num-experts", "2")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "has 4 experts per MoE layer but the model has 2: use --num-experts 4" in last


@pytest.mark.timeout(300)
def test_resume_with_other_model_flags_names_each_flag(tiny_data, trained_once, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes((trained_once / "checkpoint_last.pt").read_bytes())
    proc = resume(tiny_data, save, "--moe-freq", "1", "--encoder-ffn-embed-dim", "128")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        f"--moe-freq is 1 here but 2, --encoder-ffn-embed-dim is 128 here but 64 in "
        f"{save / 'checkpoint_last.pt'}: use --moe-freq 2 --encoder-ffn-embed-dim 64 "
        "(or a new --save-dir)"
    ) in last


@pytest.mark.timeout(300)
def test_checkpoint_with_another_dictionary(tiny_data, trained_once, tmp_path):
    # the same data with a smaller dictionary
    other = tmp_path / "databin"
    raw = tiny_data["raw"]
    # fmt: off
    run_cli(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de",
             "--trainpref", raw / "train", "--validpref", raw / "valid", "--destdir", other,
             "--joined-dictionary", "--nwordssrc", "200", "--workers", "1"])
    # fmt: on
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes((trained_once / "checkpoint_last.pt").read_bytes())
    proc = train_py(other, save, 4, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "embed_tokens.weight has" in last and "dict.*.txt" in last


def test_every_checkpoint_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(
    tmp_path, monkeypatch
):
    """The expert shards, the copies and the shared file fairseq writes itself survive a
    power loss, not only a kill: data on disk before the rename, the rename after."""
    import stat

    import torch
    from fairseq import checkpoint_utils

    from user.checkpoint import io as ckpt_io

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync dir", os.readlink(f"/proc/self/fd/{fd}")))
            raise OSError(22, "this file system refuses to fsync a folder")  # tolerated
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", os.path.basename(a), os.path.basename(b)))
        return real_replace(a, b)

    def rename(a, b):
        events.append(("rename", os.path.basename(a), os.path.basename(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    folder = ("fsync dir", str(tmp_path))
    checkpoint_utils.torch_persistent_save({"a": torch.ones(2)}, str(tmp_path / "shared.pt"))
    assert events == [
        ("fsync", "shared.pt.tmp"),
        ("rename", "shared.pt.tmp", "shared.pt"),
        folder,
    ], "fairseq's own write of the shared checkpoint"
    tmp = os.path.basename(ckpt_io.tmp_file(str(tmp_path / "x")))[1:]  # ".tmp.<host>.<pid>"
    events.clear()
    ckpt_io.atomic_save({"a": torch.ones(2)}, str(tmp_path / "shard.pt"))
    assert events == [("fsync", "shard.pt" + tmp), ("rename", "shard.pt" + tmp, "shard.pt"), folder]
    events.clear()
    assert checkpoint_utils.PathManager.copy(
        str(tmp_path / "shared.pt"), str(tmp_path / "last.pt"), overwrite=True
    )
    assert events == [("fsync", "last.pt" + tmp), ("rename", "last.pt" + tmp, "last.pt"), folder]
    assert torch.equal(torch.load(tmp_path / "last.pt")["a"], torch.ones(2))


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    src, dst = tmp_path / "a.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"x" * 1000)
    dst.write_bytes(b"old")
    calls = []
    real_replace = os.replace

    def replace(a, b):
        calls.append((a, b))
        assert dst.read_bytes() == b"old", "the destination is untouched until the rename"
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"x" * 1000 and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "checkpoint_last.pt"]


@pytest.mark.timeout(300)
def test_restarting_a_finished_run_changes_nothing(tiny_data, trained_once, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    before = (trained_once / "checkpoint_last.pt").read_bytes()
    (save / "checkpoint_last.pt").write_bytes(before)
    proc = train_py(tiny_data["databin"], save, 2)
    assert "nothing to train" in proc.stdout + proc.stderr
    assert (save / "checkpoint_last.pt").read_bytes() == before
    assert '"num_updates": "3"' not in proc.stdout


@pytest.mark.timeout(120)
def test_missing_data_directory_under_fairseq_train(tmp_path):
    """``fairseq-train --user-dir user`` runs the same checks when the task is set up."""
    proc = run_cli(
        [
            "fairseq-train",
            tmp_path / "nope",
            "--user-dir",
            USER_DIR,
            *MODEL,
            "--save-dir",
            tmp_path / "ckpt",
        ],
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "fairseq-train: error: data directory" in last and "does not exist" in last
    assert "Traceback" not in proc.stderr


def test_a_dense_fairseq_checkpoint_resumes_into_its_ds_moe_twin():
    """transformer_ds_moe_X without --deepspeed_moe has transformer_X's parameters."""
    from argparse import Namespace

    from user.checkpoint import fairseq_hooks
    from user.checkpoint.format import ExpertCheckpointError

    dense = {"arch": "transformer_iwslt_de_en", "encoder_layers": 6, "decoder_layers": 6}
    state = {"cfg": {"model": Namespace(**dense)}}
    twin = Namespace(**{**dense, "arch": "transformer_ds_moe_iwslt_de_en"})
    fairseq_hooks._check_model_flags(state, "c.pt", twin)
    other = Namespace(**{**dense, "arch": "transformer_ds_moe_wmt_en_de"})
    with pytest.raises(ExpertCheckpointError, match="--arch is transformer_ds_moe_wmt_en_de here"):
        fairseq_hooks._check_model_flags(state, "c.pt", other)
