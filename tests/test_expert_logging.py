# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Watching the experts: per-layer routing statistics by hand, then a real run
whose TensorBoard event files hold them, and the heatmap script."""

import math
import re

import pytest
import torch

from user.expert_stats import expert_load_stats, layer_tag, log_routing_metrics

from conftest import REPO, USER_DIR, run_cli
from test_gating import E, make_layer, tokens_for


def test_dropped_tokens_are_the_tokens_whose_ffn_output_is_zero():
    # capacity ceil(8 / 4 * 0.5) = 1 slot per expert; 5 tokens want expert 0
    layer = make_layer(top_k=1, capacity_factor=0.5)
    layer.train()
    layer.collect_stats = True
    route = [0, 0, 0, 0, 0, 1, 2, 3]
    y = layer(tokens_for(route))
    zero_rows = int((y.reshape(len(route), -1).abs().sum(-1) == 0).sum())
    assert layer.stats["counts"].tolist() == [5, 1, 1, 1]
    assert layer.stats["dropped"] == zero_rows == 4
    assert layer.stats["routed"] == 8 and layer.stats["tokens"] == 8


def test_gate_entropy_is_log_e_for_a_uniform_router_and_padding_is_left_out():
    layer = make_layer(top_k=1)
    layer.collect_stats = True
    with torch.no_grad():
        layer.moe.deepspeed_moe.gate.wg.weight.zero_()
    x = tokens_for([0, 1, 2, 3, 0, 1])
    pad = torch.tensor([[False] * 4 + [True] * 2])  # B x T
    layer(x, pad)
    assert layer.stats["tokens"] == 4
    assert layer.stats["entropy"] == pytest.approx(4 * math.log(E), rel=1e-6)


def test_layer_tags_and_summable_logging_outputs():
    assert layer_tag("encoder.layers.3.moe_ffn") == "enc3"
    assert layer_tag("decoder.layers.0.moe_ffn") == "dec0"

    class Fake:
        def routing_stats(self):
            return {
                "encoder.layers.1.moe_ffn": {
                    "counts": torch.tensor([3.0, 1.0]),
                    "dropped": 1.0,
                    "routed": 4.0,
                    "tokens": 4.0,
                    "entropy": 2.0,
                    "aux": 1.5,
                }
            }

    out = expert_load_stats(Fake())
    assert out["_moe_enc1_n0"] == 3 and out["_moe_enc1_n1"] == 1 and out["_moe_enc1_drop"] == 1
    assert out["_moe_load_max"] == 6 and out["_moe_load_tot"] == 4


def fake_rank(**layers):
    """One rank's logging output: ``tag=(routed, dropped, tokens, entropy)`` per layer."""

    class Fake:
        def routing_stats(self):
            return {
                f"{'encoder' if tag[:3] == 'enc' else 'decoder'}.layers.{tag[3:]}.moe_ffn": {
                    "counts": torch.tensor([routed, 0.0]),
                    "dropped": dropped,
                    "routed": routed,
                    "tokens": tokens,
                    "entropy": entropy,
                    "aux": 1.0,
                }
                for tag, (routed, dropped, tokens, entropy) in layers.items()
            }

    return expert_load_stats(Fake())


def test_drop_and_entropy_over_all_layers_sum_over_ranks_before_dividing():
    from fairseq import metrics

    ranks = [
        fake_rank(enc1=(10, 5, 10, 10.0), dec0=(10, 0, 10, 2.0)),
        fake_rank(enc1=(60, 6, 60, 30.0), dec0=(120, 9, 120, 48.0)),
    ]
    with metrics.aggregate(new_root=True) as agg:
        log_routing_metrics(ranks)
    got = agg.get_smoothed_values()
    # 20 of 200 assignments dropped (a mean of the ranks' shares would be 0.167, of the
    # layers' 0.113); 90 nats over 200 tokens (means of ranks, of layers: 0.517, 0.478)
    assert got["moe_drop"] == pytest.approx(0.1)
    assert got["moe_ent"] == pytest.approx(0.45)
    assert got["moe_enc1_drop"] == pytest.approx(11 / 70, abs=1e-4)
    keys = list(got)
    assert keys.index("moe_drop") < keys.index("moe_enc1_e0"), "the summary comes first"


STATS = {
    "loss": 9.5,
    "moe_imbalance": 1.5,
    "moe_drop": 0.1,
    "moe_ent": 1.2,
    "moe_enc0_e0": 0.4,
    "moe_enc0_drop": 0.2,
    "moe_dec11_aux": 1.1,
    "num_updates": 3,
}
SUMMARY = ["loss", "moe_imbalance", "moe_drop", "moe_ent", "num_updates"]


@pytest.mark.parametrize("show", ["summary", "all"])
def test_console_bars_print_the_summary_and_the_other_loggers_get_every_scalar(show, tmp_path):
    from fairseq.logging import progress_bar

    from user import patches
    from user.expert_stats import CONSOLE_METRICS

    patches.install(patches.TASK)  # as the task's setup does
    token = CONSOLE_METRICS.set(show)  # as the task does when it builds its model
    try:
        simple = progress_bar.SimpleProgressBar([0], epoch=1, log_interval=1)
        tqdm = progress_bar.TqdmProgressBar([0], epoch=1)
        json = progress_bar.JsonProgressBar([0], epoch=1, log_interval=1)
        console = SUMMARY if show == "summary" else list(STATS)
        assert list(simple._format_stats(STATS)) == list(tqdm._format_stats(STATS)) == console
        assert list(json._format_stats(STATS)) == list(STATS)

        written = {}

        class Writer:
            def add_scalar(self, key, value, step):
                written[key] = value

            def flush(self):
                pass

        tb = progress_bar.TensorboardProgressBarWrapper(simple, str(tmp_path))
        tb._writer = lambda tag: Writer()
        printed = []
        simple._str_pipes = lambda stats: printed.append(list(stats)) or ""
        tb.print(dict(STATS), tag="train")
        assert set(written) == set(STATS) - {"num_updates"} and printed == [console]
    finally:
        CONSOLE_METRICS.reset(token)


def train_tiny(databin, save, *extra):
    """A 4-update run of a 1+1-layer model, every layer MoE; returns its console output."""
    # fmt: off
    proc = run_cli(["python", USER_DIR / "train.py", databin, "--task",
             "translation_deepspeed", "--arch", "transformer_ds_moe_tiny", "--encoder-embed-dim", "16",
             "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "24",
             "--encoder-layers", "1", "--decoder-layers", "1", "--deepspeed_moe", "enc,dec",
             "--num-experts", "4", "--moe-freq", "1", "--moe-capacity-factor", "0.5",
             "--criterion", "model_and_base", "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "800",
             "--max-update", "4", "--log-interval", "2", "--num-workers", "0", "--save-dir", save,
             "--no-save", *extra])
    # fmt: on
    return proc.stdout + proc.stderr


PER_LAYER_ON_CONSOLE = re.compile(r"moe_(enc|dec)0_(e\d|drop|ent|aux)[= ]")
PER_LAYER_IN_JSON = re.compile(r'"(train_|valid_)?moe_(enc|dec)0_(e\d|drop|ent|aux)": ')


@pytest.mark.timeout(300)
def test_a_run_writes_per_layer_scalars_to_tensorboard_and_the_plot_reads_them(tiny_data, tmp_path):
    tb = tmp_path / "tb"
    console = train_tiny(
        tiny_data["databin"],
        tmp_path / "ckpt",
        "--log-format",
        "simple",
        "--tensorboard-logdir",
        tb,
    )
    # the console's summary: per-layer scalars go to TensorBoard only (by default)
    for kind in ("train_inner", "valid", "train"):
        (line,) = [ln for ln in console.splitlines() if f"| {kind} |" in ln][-1:]
        for key in ("moe_imbalance", "moe_drop", "moe_ent", "loss_experts_gate_loss"):
            assert re.search(rf"\b{key}[= ]", line), (kind, key, line)
    assert not PER_LAYER_ON_CONSOLE.search(console), console[-3000:]
    from scripts.plot_experts import load_matrices, plot, read_scalars

    for split in ("train_inner", "valid"):
        scalars = read_scalars(str(tb / split))
        for layer in ("enc0", "dec0"):
            loads = [scalars[f"moe_{layer}_e{i}"] for i in range(4)]
            steps = [s for s, _ in loads[0]]
            assert steps and all([s for s, _ in ld] == steps for ld in loads)
            for k in range(len(steps)):  # fractions of the layer's tokens: they add up to 1
                assert sum(ld[k][1] for ld in loads) == pytest.approx(1.0, abs=2e-3)
            for name in ("drop", "ent", "aux"):
                assert f"moe_{layer}_{name}" in scalars, name
            if split == "train_inner":
                # capacity factor 0.5 must drop tokens while training; never at validation
                assert max(v for _, v in scalars[f"moe_{layer}_drop"]) > 0
            else:
                assert all(v == 0 for _, v in scalars[f"moe_{layer}_drop"])
            assert 0 < scalars[f"moe_{layer}_ent"][-1][1] <= math.log(4) + 1e-6
    assert set(load_matrices(read_scalars(str(tb / "train_inner")))) == {"enc0", "dec0"}
    png = tmp_path / "experts.png"
    run_cli(["python", REPO / "scripts" / "plot_experts.py", tb, "-o", png])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot(str(tb), str(tmp_path / "v.png"), "valid") == 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "flags,per_layer",
    [
        (("--log-format", "simple", "--moe-console-metrics", "all"), PER_LAYER_ON_CONSOLE),
        (("--log-format", "json"), PER_LAYER_IN_JSON),
        (("--log-format", "json", "--moe-console-metrics", "all"), PER_LAYER_IN_JSON),
    ],
    ids=["simple-all", "json", "json-all"],
)
def test_every_layer_on_the_console_with_all_and_in_json_always(
    tiny_data, tmp_path, flags, per_layer
):
    console = train_tiny(tiny_data["databin"], tmp_path / "ckpt", *flags)
    for kind in ("train_inner", "valid", "train"):
        (line,) = [ln for ln in console.splitlines() if f"| {kind} |" in ln][-1:]
        assert per_layer.search(line) and "moe_drop" in line, (kind, line)


def test_validation_logs_the_routing_of_the_loss_forward_not_of_bleu_decoding(tiny_data):
    """With --eval-bleu, validation decodes after the loss forward; decoding collects
    no routing statistics, so the logged ones are the loss forward's."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from moe_helpers import TINY, sample_batch

    parser = options.get_training_parser()
    # fmt: off
    args = options.parse_args_and_arch(parser, [
        str(tiny_data["databin"]), "--task", "translation_deepspeed", "--arch",
        "transformer_ds_moe_tiny", *TINY, "--deepspeed_moe", "enc,dec", "--num-experts", "4",
        "--criterion", "model_and_base", "--eval-bleu", "--eval-bleu-detok", "space",
        "--eval-bleu-args", '{"beam": 2, "max_len_b": 5}'])
    # fmt: on
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    model = task.build_model(cfg.model).eval()
    crit = task.build_criterion(cfg.criterion)
    batch = sample_batch(task, 6)
    with torch.no_grad():
        crit(model, batch)
        want = expert_load_stats(model)
        _, _, log = task.valid_step(batch, model, crit)
    assert "_bleu_sys_len" in log, "BLEU decoding ran"
    got = {k: v for k, v in log.items() if k.startswith("_moe_")}
    assert got == want and got
