# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The reference plugin's README commands, as docs/coming-from-the-reference.md says they
work: its example train command (CPU instead of --fp16, 3 updates), its generate command and
its scoring command, as typed. run.sh's ``test`` mode and ``RECIPE=reference`` are dry runs
in test_run_sh.py."""

import pytest

from mt_run import fairseq_log, processes

from conftest import REPO, USER_DIR, run_cli

# the README's Config (NUM_GPUS=1, NUM_EXPERTS=4: one CPU process) with its gate-loss weight
# fmt: off
CONFIG = ["--ddp-backend=legacy_ddp", "--task", "translation_deepspeed",
          "--deepspeed_moe", "enc,dec", "--ep-world-size", "1", "--num-experts", "4",
          "--top-k", "1", "--criterion", "model_and_base",
          "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 10}',
          "--base-criterion", "label_smoothed_cross_entropy",
          "--base-criterion-config", '{"label_smoothing": 0.1}']
# fmt: on


@pytest.mark.timeout(300)
def test_the_reference_train_generate_and_score_commands_run_as_typed(tiny_data, tmp_path):
    db, tb = tiny_data["databin"], tmp_path / "tb"
    save = tmp_path / "checkpoints" / "transformer_ds_moe_tiny-moe_g1_ep1_ex4_k1_encdec"
    # fmt: off
    train = run_cli([
        "python", USER_DIR / "train.py", db, "--seed", "43821", "--user-dir", USER_DIR, *CONFIG,
        "--cpu", "--num-workers", "0", "--arch", "transformer_ds_moe_tiny", "-s", "de", "-t", "en",
        "--reset-optimizer", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--clip-norm", "0.0", "--lr", "5e-4", "--dropout", "0.3", "--weight-decay", "0.0001",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--max-update", "3",
        "--max-tokens-valid", "1024", "--max-tokens", "1024", "--update-freq", "2",
        "--validate-interval-updates", "20", "--eval-bleu", "--scoring", "sacrebleu",
        "--eval-bleu-args", '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}',
        "--eval-bleu-detok", "moses", "--eval-bleu-remove-bpe", "--eval-bleu-print-samples",
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
        "--keep-last-epochs", "1", "--save-interval-updates", "100", "--keep-interval-updates", "1",
        "--save-dir", save, "--tensorboard-logdir", tb,
        # the reference's hard-coded gate settings, under its flag names
        "--min-capacity", "0", "--noisy-gate-policy", "Jitter",
    ])
    # fmt: on
    out = train.stdout + train.stderr
    log = fairseq_log.parse(out)  # (fairseq's default log interval: the epoch's line only)
    assert log["train"] and log["train"][-1]["num_updates"] == 3, out[-3000:]
    assert "experts_gate_loss 10 is above 1" in out
    assert "--min-capacity is deprecated" in out and "--noisy-gate-policy is deprecated" in out
    assert "bleu" in log["valid"][-1], "BLEU during training"
    ckpt = save / "checkpoint_best.pt"
    assert ckpt.is_file()

    # fmt: off
    gen = run_cli([
        "python", USER_DIR / "generate.py", db, "--seed", "43821", "--user-dir", USER_DIR,
        "--path", ckpt, "--max-tokens-valid", "8192", "--save-dir", save,
        "--tensorboard-logdir", tb, "--beam", "4", "--lenpen", "0.6", "--remove-bpe", "--cpu",
    ])
    # fmt: on
    hyps = [ln for ln in gen.stdout.splitlines() if ln.startswith("H-")]
    assert len(hyps) == 24  # the test split
    gen_out = tmp_path / "gen.out"
    gen_out.write_text(gen.stdout)

    # scoring: the reference's argument order; offline (as here), one line on what to do
    dead = f"http://127.0.0.1:{processes.free_port()}"  # a port that refuses
    cache = tmp_path / "sacrebleu"
    cache.mkdir()
    proxies = {k: dead for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    score = run_cli(["bash", REPO / "scripts" / "sacrebleu.sh", "wmt14/full", "en", "de", gen_out],
                    check=False, timeout=90, SACREBLEU=str(cache), no_proxy="", NO_PROXY="",
                    **proxies)  # fmt: skip
    assert score.returncode == 2, score.stderr
    (line,) = score.stderr.strip().splitlines()
    assert "could not download the test set wmt14/full" in line and "plain-text reference" in line
