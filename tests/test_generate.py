# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Evaluation with MoE: merging per-rank outputs, lockstep beam search across
expert-parallel processes (same hypotheses as one process), --eval-bleu with
EP=2, fairseq-interactive and the hub interface."""

import re
import subprocess

import pytest

from mt_run import fairseq_log
from user.entry import merge_generate_outputs

from conftest import BIN, REPO, USER_DIR, cli_env, run_cli
from ep_helpers import torchrun, train2_output

# fmt: off
GEN = ["--task", "translation_deepspeed", "--gen-subset", "valid", "--beam", "3",
       "--max-len-a", "1.2", "--max-len-b", "4", "--batch-size", "8", "--num-workers", "0"]
# fmt: on


def test_rank_outputs_merge_in_sentence_order():
    rank0 = "S-2\ta b\nH-2\t-0.1\tx\nD-2\t-0.1\tx\nP-2\t-0.1\nS-0\tc\nH-0\t-0.2\ty\nGenerate valid with beam=3: BLEU4 = 1.0\n"
    rank1 = "S-1\td\nT-1\te\nH-1\t-0.3\tz\n"
    merged = merge_generate_outputs([rank0, rank1]).splitlines()
    assert merged[:9] == [
        "S-0\tc",
        "H-0\t-0.2\ty",
        "S-1\td",
        "T-1\te",
        "H-1\t-0.3\tz",
        "S-2\ta b",
        "H-2\t-0.1\tx",
        "D-2\t-0.1\tx",
        "P-2\t-0.1",
    ]
    assert not any(ln.startswith("Generate ") for ln in merged)  # rank 0's shard-only BLEU
    assert "3 sentences from 2 processes" in merged[-1]


def hypotheses(text):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", text, re.M)}


@pytest.fixture(scope="module")
def one_process(tiny_data, ep2_run):
    """The hypotheses of ep2_run's checkpoint translated in one process."""
    ckpt = ep2_run["save"] / "checkpoint_last.pt"
    db = tiny_data["databin"]
    one = run_cli(["python", USER_DIR / "generate.py", db, *GEN, "--path", ckpt, "--cpu"])
    h1 = hypotheses(one.stdout)
    assert len(h1) == 40
    return h1


@pytest.mark.timeout(600)
def test_two_process_lockstep_generation_equals_one_process(tiny_data, ep2_run, one_process):
    ckpt = ep2_run["save"] / "checkpoint_last.pt"
    db = tiny_data["databin"]
    # 40 sentences in batches of 8 over 2 ranks: rank 0 gets 3 batches, rank 1 two
    # and a dummy; every batch stops decoding at its own step: both lockstep paths
    # (no --task: user/generate.py uses the plugin's task by default)
    two = torchrun(USER_DIR / "generate.py", db, *GEN[2:], "--path", ckpt)
    assert hypotheses(two.stdout) == one_process
    ids = [int(m) for m in re.findall(r"^H-(\d+)\t", two.stdout, re.M)]
    assert ids == sorted(ids), "gathered output is in sentence order"


@pytest.mark.scale
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ep_size", [2, 4])
def test_four_process_lockstep_generation_equals_one_process(
    tiny_data, ep2_run, one_process, tmp_path, ep_size
):
    """4 processes: E=2 with two data-parallel replicas (the checkpoint's layout), or
    E=4 (the checkpoint resharded, which changes no number). 40 sentences in batches
    of 8: rank 0 decodes two batches, the others one and then dummies, each batch
    ending at its own step."""
    from user.checkpoint.reshard import reshard

    ckpt = ep2_run["save"] / "checkpoint_last.pt"
    if ep_size == 4:
        ckpt = tmp_path / "ep4" / "checkpoint_last.pt"
        ckpt.parent.mkdir()
        reshard(str(ep2_run["save"] / "checkpoint_last.pt"), str(ckpt), 4)
    db = tiny_data["databin"]
    four = torchrun(USER_DIR / "generate.py", db, *GEN[2:], "--path", ckpt, nproc=4, timeout=500)
    assert f"--ep-world-size {ep_size}: " in four.stderr, four.stderr[-3000:]
    assert hypotheses(four.stdout) == one_process


@pytest.mark.timeout(60)
def test_expert_parallel_model_under_fairseqs_default_task_is_refused(tiny_data):
    """fairseq's ``translation`` task (``fairseq-generate`` without ``--task``) would
    build an expert-parallel model without expert groups or lockstep: it failed
    inside DeepSpeed's first all-to-all; now one clear error before any work."""
    from fairseq import options, tasks

    from user.moe_options import MoEArgumentError

    from moe_helpers import TINY

    parser = options.get_training_parser()
    # fmt: off
    args = options.parse_args_and_arch(parser, [
        str(tiny_data["databin"]), "--task", "translation", "--arch", "transformer_ds_moe_tiny",
        *TINY, "--deepspeed_moe", "enc,dec", "--num-experts", "4", "--ep-world-size", "2"])
    # fmt: on
    task = tasks.setup_task(args)
    with pytest.raises(
        MoEArgumentError,
        match="needs --task translation_deepspeed "
        r"\(got TranslationTask\)",
    ):
        task.build_model(args)


@pytest.mark.timeout(600)
def test_eval_bleu_with_expert_parallel_training(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    # fmt: off
    out = train2_output(
        tiny_data["databin"], save, 4, "--validate-interval-updates", "2",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 2, "max_len_a": 1.2, "max_len_b": 4}',
        "--eval-bleu-detok", "space", "--best-checkpoint-metric", "bleu",
        "--maximize-best-checkpoint-metric")
    # fmt: on
    assert sorted(fairseq_log.losses_by_update(out)) == [1, 2, 3, 4]
    # every validation decoded (lockstep across the 2 ranks) and was scored
    bleu = [v["bleu"] for v in fairseq_log.parse(out)["valid"]]
    assert len(bleu) >= 2, out[-3000:]
    from user.checkpoint.io import read_checkpoint

    # read as data (with 2 processes fairseq saves BLEU's counts as float64 arrays)
    best = read_checkpoint(str(save / "checkpoint_best.pt"))
    # the best checkpoint records the best of those scores (fairseq logs them rounded)
    assert best["extra_state"]["best"] == pytest.approx(max(bleu), abs=0.005), bleu


@pytest.mark.timeout(300)
def test_interactive_and_hub_translate_with_a_consolidated_checkpoint(tiny_data, ep2_run, tmp_path):
    from user.checkpoint.reshard import reshard

    cons = tmp_path / "model.pt"
    reshard(str(ep2_run["save"] / "checkpoint_last.pt"), str(cons), 1)
    db = tiny_data["databin"]
    # fmt: off
    proc = subprocess.run(
        [str(BIN / "fairseq-interactive"), str(db), "--user-dir", str(USER_DIR), "--path", str(cons),
         "--task", "translation_deepspeed", "--source-lang", "en", "--target-lang", "de",
         "--beam", "2", "--cpu"],
        input="the file is open .\n", capture_output=True, text=True, timeout=240,
        env=cli_env(), cwd=REPO)
    # fmt: on
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^H-0\t\S+\t", proc.stdout, re.M), proc.stdout[-2000:]

    from fairseq.models.transformer import TransformerModel

    hub = TransformerModel.from_pretrained(
        str(tmp_path),
        checkpoint_file="model.pt",
        data_name_or_path=str(db),
        user_dir=str(USER_DIR),
        source_lang="en",
        target_lang="de",
        beam=2,
    )
    out = hub.translate("the file is open .")
    assert isinstance(out, str) and out.strip()
    assert hub.models[0].moe_opts.ep_size == 1 and len(hub.models[0].moe_ffn_layers()) == 2


@pytest.mark.timeout(300)
def test_a_checkpoints_saved_flags_are_not_held_to_this_runs_rules(tiny_data, tmp_path):
    """Generation builds the model from the training run's saved flags: its data directory
    may be gone and it may have trained in fp16 on GPUs; only the model's rules apply."""
    import shutil

    import torch

    from test_cli import MODEL

    trained_on = tmp_path / "db_then"
    shutil.copytree(tiny_data["databin"], trained_on)
    save = tmp_path / "ckpt"
    run_cli(["python", USER_DIR / "train.py", trained_on, *MODEL, "--save-dir", save,
             "--max-update", "2"])  # fmt: skip
    shutil.rmtree(trained_on)
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    state["cfg"]["model"].fp16 = True  # as a GPU run saves it
    torch.save(state, save / "checkpoint_last.pt")
    out = run_cli(["python", USER_DIR / "generate.py", tiny_data["databin"], *GEN,
                   "--path", save / "checkpoint_last.pt", "--cpu"])  # fmt: skip
    assert len(hypotheses(out.stdout)) == 40


@pytest.mark.timeout(300)
def test_fairseq_generate_without_task_consolidates_an_expert_parallel_checkpoint(
    tiny_data, ep2_run
):
    """fairseq's default task in one process: the shards are gathered as the file loads."""
    out = run_cli(["fairseq-generate", tiny_data["databin"], "--user-dir", USER_DIR,
                   "--path", ep2_run["save"] / "checkpoint_last.pt", *GEN[2:], "--cpu"])  # fmt: skip
    assert len(hypotheses(out.stdout)) == 40
