# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The one reader of fairseq's logs (``mt_run.fairseq_log``): the same statistics logged
in json and in simple format read the same, and the readers built on it."""

import pytest

from mt_run import fairseq_log

# three updates, their epoch and a validation, as fairseq 0.12 prints them with
# --log-format json and --log-format simple (--log-interval 1), amid other lines
JSON = """\
2026-11-30 05:47:40 | INFO | fairseq_cli.train | training on 1 devices (GPUs/TPUs)
2026-11-30 05:47:42 | INFO | train_inner | {"epoch": 1, "update": 0.001, "loss": "13.753", \
"nll_loss": "13.761", "wps": "0", "ups": "0", "wpb": "952", "num_updates": "1", "lr": "7.0099e-05"}
2026-11-30 05:47:42 | INFO | train_inner | {"epoch": 1, "update": 0.002, "loss": "13.74", \
"nll_loss": "13.747", "wps": "15306.2", "ups": "15.94", "wpb": "960", "num_updates": "2", \
"lr": "0.000140098"}
2026-11-30 05:47:42 | INFO | train_inner | {"epoch": 1, "update": 0.003, "loss": "13.7", \
"nll_loss": "13.69", "wps": "16000.5", "ups": "16.5", "wpb": "858", "num_updates": "3", \
"lr": "0.000210097"}
2026-11-30 05:47:43 | INFO | valid | {"epoch": 1, "valid_loss": "11.35", "valid_nll_loss": \
"11.021", "valid_bleu": "0.52", "valid_wps": "23711.7", "valid_num_updates": "3", \
"valid_best_loss": "11.35"}
2026-11-30 05:47:43 | INFO | train | {"epoch": 1, "train_loss": "13.712", "train_nll_loss": \
"13.716", "train_wps": "14909.5", "train_num_updates": "3", "train_wall": "2"}
2026-11-30 05:47:43 | INFO | fairseq_cli.train | done training in 3.5 seconds
"""
SIMPLE = """\
2026-11-30 05:47:40 | INFO | fairseq_cli.train | training on 1 devices (GPUs/TPUs)
2026-11-30 05:47:42 | INFO | train_inner | epoch 001:      1 / 980 loss=13.753, \
nll_loss=13.761, wps=0, ups=0, wpb=952, num_updates=1, lr=7.0099e-05
2026-11-30 05:47:42 | INFO | train_inner | epoch 001:      2 / 980 loss=13.74, \
nll_loss=13.747, wps=15306.2, ups=15.94, wpb=960, num_updates=2, lr=0.000140098
2026-11-30 05:47:42 | INFO | train_inner | epoch 001:      3 / 980 loss=13.7, \
nll_loss=13.69, wps=16000.5, ups=16.5, wpb=858, num_updates=3, lr=0.000210097
2026-11-30 05:47:43 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 11.35 | \
nll_loss 11.021 | bleu 0.52 | wps 23711.7 | num_updates 3 | best_loss 11.35
2026-11-30 05:47:43 | INFO | train | epoch 001 | loss 13.712 | nll_loss 13.716 | \
wps 14909.5 | num_updates 3 | wall 2
2026-11-30 05:47:43 | INFO | fairseq_cli.train | done training in 3.5 seconds
"""


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", [JSON, SIMPLE], ids=["json", "simple"])
def test_both_formats_give_the_records(text):
    log = fairseq_log.parse(text)
    assert [r["num_updates"] for r in log["train_inner"]] == [1.0, 2.0, 3.0]
    assert log["train_inner"][1]["wps"] == 15306.2 and log["train_inner"][0]["lr"] == 7.0099e-05
    assert all(r["epoch"] == 1.0 for kind in fairseq_log.KINDS for r in log[kind])
    (valid,) = log["valid"]
    assert valid["bleu"] == 0.52 and valid["num_updates"] == 3.0 and valid["best_loss"] == 11.35
    (train,) = log["train"]
    assert train["wps"] == 14909.5 and train["loss"] == 13.712
    assert fairseq_log.losses_by_update(text) == {1: 13.753, 2: 13.74, 3: 13.7}
    assert fairseq_log.wps(text) == [0.0, 15306.2, 16000.5]
    assert fairseq_log.wps(text, skip=1) == [15306.2, 16000.5]
    assert fairseq_log.wps(text, kind="train") == [14909.5]
    assert fairseq_log.training_seconds(text) == "3.5" and fairseq_log.resumed_updates(text) is None


@pytest.mark.timeout(10)
def test_json_and_simple_read_the_same_except_json_extras():
    json_log, simple_log = fairseq_log.parse(JSON), fairseq_log.parse(SIMPLE)
    for kind in fairseq_log.KINDS:
        for j, s in zip(json_log[kind], simple_log[kind]):
            j.pop("update", None)  # json's progress through the epoch
            if kind == "train":
                j.pop("wall"), s.pop("wall")  # (the lines above differ there)
                j.pop("nll_loss"), s.pop("nll_loss")
            assert j == s, kind


@pytest.mark.timeout(10)
def test_summary_of_a_fresh_and_a_resumed_run():
    assert fairseq_log.summary(SIMPLE) == {
        "updates": 3,
        "resumed": None,
        "trained": 3,
        "seconds": "3.5",
        "rate": "0.86",
    }
    resumed = (
        "2026-11-30 | INFO | fairseq.checkpoint_utils | Loaded checkpoint "
        "/w/checkpoint_last.pt (epoch 3 @ 1200 updates)\n"
    )
    assert fairseq_log.summary(resumed + SIMPLE.replace("num_updates=3", "num_updates=1203")) == {
        "updates": 1203,
        "resumed": 1200,
        "trained": 3,
        "seconds": "3.5",
        "rate": "0.86",
    }
    # resumed with nothing left to train: no record, no training time
    assert fairseq_log.summary(resumed) == {
        "updates": 1200,
        "resumed": 1200,
        "trained": 0,
        "seconds": None,
        "rate": None,
    }
    assert fairseq_log.summary("") == {
        "updates": 0,
        "resumed": None,
        "trained": 0,
        "seconds": None,
        "rate": None,
    }


@pytest.mark.timeout(10)
def test_translated_line():
    text = (
        "2026-11-30 | INFO | fairseq_cli.generate | Translated 1,000 sentences (4,997 tokens) "
        "in 1.9s (537.90 sentences/s, 2687.88 tokens/s)\n"
    )
    assert fairseq_log.translated(text) == {"sentences": 1000, "tokens": 4997, "seconds": 1.9}
    assert fairseq_log.translated(SIMPLE) is None


def test_expert_groups_lines_of_every_rank():
    # as two ranks of a two-node run logged them (user.ds_moe.log_expert_groups)
    text = (
        '2026-11-30 09:58:12 | INFO | user.ds_moe.groups | expert groups {"rank": 3, "node": 1, '
        '"local_rank": 1, "expert_parallel": [2, 3], "expert_data_parallel": [1, 3]}\n'
        "2026-11-30 09:58:12 | INFO | fairseq.trainer | no expert groups here\n"
        '2026-11-30 09:58:12 | INFO | user.ds_moe.groups | expert groups {"rank": 0, "node": null, '
        '"local_rank": null, "expert_parallel": [0, 1], "expert_data_parallel": [0, 2]}\n'
    )
    got = fairseq_log.expert_groups(text)
    assert sorted(got) == [0, 3]
    assert got[3]["node"] == 1 and got[3]["expert_data_parallel"] == [1, 3]
    assert got[0]["node"] is None and got[0]["expert_parallel"] == [0, 1]
