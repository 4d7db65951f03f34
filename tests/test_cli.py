# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""End to end through the real CLIs: fairseq-train / user/train.py trains an
MoE model on CPU, resumes exactly, fairseq-generate translates, sacrebleu scores;
bad flags fail before any work with one clear line."""

import re

import pytest
import sacrebleu

import mt_prep
from mt_run import fairseq_log

from conftest import USER_DIR, run_cli

# fmt: off
MODEL = [
    "--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "48",
    "--deepspeed_moe", "enc,dec", "--num-experts", "4", "--top-k", "1",
    "--criterion", "model_and_base", "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 0.01}',
    "--base-criterion", "label_smoothed_cross_entropy", "--base-criterion-config", '{"label_smoothing": 0.1}',
    "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "800", "--seed", "3",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--num-workers", "0",
    "--save-interval-updates", "10", "--keep-interval-updates", "1", "--no-epoch-checkpoints",
]
# fmt: on


def train(databin, save_dir, max_update, cli="fairseq-train"):
    head = (
        [cli, databin, "--user-dir", USER_DIR]
        if cli == "fairseq-train"
        else ["python", USER_DIR / "train.py", databin]
    )
    proc = run_cli([*head, *MODEL, "--save-dir", save_dir, "--max-update", max_update])
    return proc


def losses_by_update(output):
    """{num_updates: loss} from fairseq's train_inner log lines."""
    return fairseq_log.losses_by_update(output)


# updates of the module's trained model: enough (~40 epochs of the tiny data) for its
# translations to beat copying the source (BLEU 3.9 against 2.6; 2.0 after 200 updates)
TRAINED_UPDATES = 400


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("trained")
    proc = train(tiny_data["databin"], save, TRAINED_UPDATES)
    return {"save": save, "losses": losses_by_update(proc.stdout), "log": proc.stdout}


@pytest.mark.timeout(300)
def test_train_loss_falls_and_checkpoint_is_written(trained):
    losses = trained["losses"]
    assert sorted(losses) == list(range(1, TRAINED_UPDATES + 1)), "one log line per update"
    first, last = sum(losses[u] for u in (1, 2, 3)) / 3, sum(losses[u] for u in (18, 19, 20)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (trained["save"] / "checkpoint_last.pt").exists()
    assert "loss_experts_gate_loss" in trained["log"] and "moe_imbalance" in trained["log"]
    # what the model holds (fairseq's "num. expert model params" is 0 with EP=1)
    m = re.search(
        r"MoE: (\d+) layers \(.*\), 4 experts each, top-1, --ep-world-size 1: "
        r"4 experts per layer in this process, ([\d,]+) expert parameters here",
        trained["log"],
    )
    assert m and int(m.group(1)) >= 2 and int(m.group(2).replace(",", "")) > 0, trained["log"][
        :3000
    ]


@pytest.mark.timeout(300)
def test_resume_reaches_the_same_losses(tiny_data, trained, tmp_path):
    first = train(tiny_data["databin"], tmp_path, 10, cli="python")
    assert sorted(losses_by_update(first.stdout)) == list(range(1, 11))
    resumed = train(tiny_data["databin"], tmp_path, 20, cli="python")
    assert "Loaded checkpoint" in resumed.stdout
    after = losses_by_update(resumed.stdout)
    assert sorted(after) == list(range(11, 21)), "resume must continue at update 11"
    for u in range(11, 21):
        assert after[u] == trained["losses"][u], f"update {u}: {after[u]} != {trained['losses'][u]}"


def hypotheses(output):
    hyps = {}
    for line in output.splitlines():
        if line.startswith("D-"):
            idx, _, text = line[2:].split("\t", 2)
            hyps[int(idx)] = text
    return [hyps[i] for i in sorted(hyps)]


@pytest.mark.timeout(300)
def test_generate_translates_and_sacrebleu_scores(tiny_data, trained):
    # fmt: off
    args = [tiny_data["databin"], "--path", trained["save"] / "checkpoint_last.pt",
            "--gen-subset", "test", "--beam", "3", "--batch-size", "8", "--max-len-b", "20"]
    # fmt: on
    # fmt: off
    out = run_cli(["fairseq-generate", *args, "--user-dir", USER_DIR, "--task", "translation_deepspeed"])
    # fmt: on
    hyps = hypotheses(out.stdout)
    refs = (tiny_data["raw"] / "test.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 24
    assert any(h.strip() for h in hyps)
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    # better than copying the source, and than what these hypotheses score against other
    # sentences' references (each against the next one's): they translate their own source
    srcs = (tiny_data["raw"] / "test.en").read_text(encoding="utf-8").splitlines()
    copied = mt_prep.copy_source_bleu(srcs, refs)
    unrelated = sacrebleu.corpus_bleu(hyps, [refs[1:] + refs[:1]])
    assert bleu.score > max(copied.score, unrelated.score), (bleu, copied, unrelated)
    again = run_cli(["python", USER_DIR / "generate.py", *args])
    assert hypotheses(again.stdout) == hyps, "generation must be deterministic across entry points"


@pytest.mark.timeout(120)
def test_bad_flag_fails_before_any_work(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli(
        [
            "python",
            USER_DIR / "train.py",
            tiny_data["databin"],
            *MODEL,
            "--num-experts",
            "6",
            "--ep-world-size",
            "4",
            "--save-dir",
            save,
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "error: --num-experts 6 is not divisible by --ep-world-size 4: each expert-parallel rank "
            "holds num_experts / ep_world_size experts; use a multiple of 4 experts or a divisor of 6 "
            "as --ep-world-size"
        )
    )
    assert not save.exists(), "nothing may be written on bad input"


@pytest.mark.timeout(120)
def test_bad_flag_under_fairseq_train_is_one_clear_line(tiny_data, tmp_path):
    # fmt: off
    proc = run_cli(["fairseq-train", tiny_data["databin"], "--user-dir", USER_DIR, *MODEL,
                    "--deepspeed_moe", "enc,dex", "--save-dir", tmp_path / "ckpt"], check=False)
    # fmt: on
    assert proc.returncode != 0
    assert "fairseq-train: error: --deepspeed_moe 'enc,dex': unknown part 'dex'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "ckpt").glob("*.pt"))


@pytest.mark.timeout(180)
def test_a_reference_command_line_trains_with_warnings(tiny_data, tmp_path):
    """The reference plugin's spellings and gate weight, through user/train.py."""
    from fairseq import checkpoint_utils

    from conftest import train_py

    save = tmp_path / "ckpt"
    # fmt: off
    proc = train_py(tiny_data["databin"], save, 2, "--min-capacity", "2",
                    "--noisy-gate-policy", "Jitter",
                    "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 10}')
    # fmt: on
    out = proc.stdout + proc.stderr
    for old, new in (("--min-capacity", "--moe-min-capacity"), (NOISY_OLD, NOISY_NEW)):
        (line,) = [ln for ln in out.splitlines() if f"{old} is deprecated" in ln]
        assert "WARNING" in line and f"use {new}" in line
    (line,) = [ln for ln in out.splitlines() if "--loss-weights: experts_gate_loss 10" in ln]
    assert "WARNING" in line
    assert fairseq_log.losses_by_update(out).keys() >= {1, 2}  # training went on
    # the checkpoint saved the new names and builds the model again
    models, cfg = checkpoint_utils.load_model_ensemble([str(save / "checkpoint_last.pt")])
    assert (cfg.model.moe_min_capacity, cfg.model.moe_noisy_gate_policy) == (2, "Jitter")
    assert models[0].moe_opts.min_capacity == 2


NOISY_OLD, NOISY_NEW = "--noisy-gate-policy", "--moe-noisy-gate-policy"
