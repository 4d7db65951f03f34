# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Pure tests of the MoE flags: parsing, defaults, validation messages."""

import logging
import re
from argparse import Namespace

import pytest

from user.moe_options import (
    MoEArgumentError,
    MoEOptions,
    moe_defaults,
    options_from_args,
    parse_sides,
    validate,
)


def args(**kw):
    a = Namespace(encoder_layers=2, decoder_layers=2, **kw)
    moe_defaults(a)
    return a


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, set()),
        ("", set()),
        ("enc", {"enc"}),
        ("dec", {"dec"}),
        ("enc,dec", {"enc", "dec"}),
        ("dec, enc", {"enc", "dec"}),
    ],
)
def test_parse_sides(value, expected):
    assert parse_sides(value) == frozenset(expected)


@pytest.mark.parametrize("value", ["encoder", "enc,dex", "enc;dec", ","])
def test_unknown_side_names_the_flag(value):
    with pytest.raises(MoEArgumentError, match="--deepspeed_moe"):
        parse_sides(value)


def test_defaults_match_documented_values():
    opts = options_from_args(args(deepspeed_moe="enc,dec"))
    assert opts == MoEOptions(sides=frozenset({"enc", "dec"}))
    assert (opts.num_experts, opts.ep_size, opts.top_k, opts.freq) == (8, 1, 1, 2)
    assert opts.drop_tokens and not opts.eval_drop_tokens and opts.use_rts


def test_given_values_survive_defaults():
    a = args(
        deepspeed_moe="dec",
        num_experts=4,
        top_k=2,
        moe_freq=1,
        moe_capacity_factor=2.0,
        moe_drop_tokens=False,
        moe_noisy_gate_policy="None",
    )
    opts = options_from_args(a)
    assert (opts.num_experts, opts.top_k, opts.freq, opts.capacity_factor) == (4, 2, 1, 2.0)
    assert opts.drop_tokens is False and opts.noisy_gate_policy is None


def test_experts_not_divisible_by_ep_size():
    with pytest.raises(
        MoEArgumentError, match=r"--num-experts 6 is not divisible by --ep-world-size 4"
    ):
        options_from_args(args(deepspeed_moe="enc", num_experts=6, ep_world_size=4))


@pytest.mark.parametrize("k", [0, 5, -1])
def test_top_k_out_of_range(k):
    with pytest.raises(
        MoEArgumentError, match=rf"--top-k {k} is out of range.*--num-experts \(4\)"
    ):
        options_from_args(args(deepspeed_moe="enc", num_experts=4, top_k=k))


def test_dense_model_ignores_moe_values():
    # without --deepspeed_moe nothing is MoE, so MoE values are not checked
    assert options_from_args(args(num_experts=6, ep_world_size=4)).sides == frozenset()


def test_moe_freq_that_places_no_layer_is_refused():
    a = args(deepspeed_moe="enc", moe_freq=2)
    a.encoder_layers = 1
    with pytest.raises(
        MoEArgumentError, match="--moe-freq 2 and --encoder-layers 1 places no MoE layer"
    ):
        options_from_args(a)


def test_noisy_gate_needs_top1():
    with pytest.raises(
        MoEArgumentError, match="--moe-noisy-gate-policy Jitter works with --top-k 1"
    ):
        options_from_args(args(deepspeed_moe="enc", top_k=2, moe_noisy_gate_policy="Jitter"))


def test_bias_balance_is_refused_where_it_has_no_say_or_below_zero():
    with pytest.raises(MoEArgumentError, match="--moe-bias-balance 0.01 with --moe-noisy-gate"):
        options_from_args(
            args(deepspeed_moe="enc", moe_bias_balance=0.01, moe_noisy_gate_policy="RSample")
        )
    with pytest.raises(MoEArgumentError, match="--moe-bias-balance.*must be 0 or more"):
        options_from_args(args(deepspeed_moe="enc", moe_bias_balance=-0.1))
    on = options_from_args(args(deepspeed_moe="enc", moe_bias_balance=0.01))
    assert on.bias_balance == 0.01


@pytest.mark.parametrize(
    "freq,layers,expected", [(1, 3, [0, 1, 2]), (2, 4, [1, 3]), (3, 6, [2, 5])]
)
def test_every_nth_layer_is_moe(freq, layers, expected):
    opts = MoEOptions(sides=frozenset({"enc"}), freq=freq)
    assert [i for i in range(layers) if opts.is_moe_layer("enc", i)] == expected
    assert not any(opts.is_moe_layer("dec", i) for i in range(layers))


def test_the_readme_flag_table_documents_every_flag():
    """README's MoE flag table and the flag table in the code stay one list."""
    from user.moe_options import FLAGS

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## MoE flags") :]
    table = table[: table.index("\n\n", table.index("| flag |"))]
    documented = {f for f in re.findall(r"`(--[a-z0-9_-]+)", table) if not f.endswith("-")}
    in_code = {f.names[0] for f in FLAGS}
    assert in_code - documented == set(), "flags missing from README's table"
    assert documented - in_code - {f.off for f in FLAGS} == set(), "README documents unknown flags"


# --------------------------------------------------------------------------- old spellings


def parse(*flags):
    """Flags parsed by fairseq's training parser, as ``fairseq-train`` parses them."""
    from fairseq import options

    # fmt: off
    return options.parse_args_and_arch(options.get_training_parser(), [
        "databin", "--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny",
        "--deepspeed_moe", "enc", "--num-experts", "4", *flags])
    # fmt: on


NOISY = "--moe-noisy-gate-policy"


def deprecation_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize(
    "given,field,value,new",
    [
        (["--min-capacity", "2"], "min_capacity", 2, "--moe-min-capacity"),
        (["--min-capacity=0"], "min_capacity", 0, "--moe-min-capacity"),
        (["--noisy-gate-policy", "Jitter"], "noisy_gate_policy", "Jitter", NOISY),
        (["--noisy-gate-policy=None"], "noisy_gate_policy", None, NOISY),
    ],
)
def test_the_reference_spellings_set_our_flags_with_one_warning(given, field, value, new, caplog):
    with caplog.at_level(logging.WARNING):
        a = parse(*given)
    assert getattr(options_from_args(a), field) == value
    old = given[0].split("=")[0]
    (warning,) = deprecation_warnings(caplog)
    assert warning.startswith(f"{old} is deprecated") and f"use {new}" in warning
    # one flag, one dest: the saved config (and a checkpoint's) knows only the new name
    assert not hasattr(a, old[2:].replace("-", "_"))


def test_our_spellings_give_no_warning_and_the_last_one_wins(caplog):
    with caplog.at_level(logging.WARNING):
        a = parse("--moe-min-capacity", "2", "--moe-noisy-gate-policy", "RSample")
    assert (a.moe_min_capacity, a.moe_noisy_gate_policy) == (2, "RSample")
    assert deprecation_warnings(caplog) == []
    a = parse("--min-capacity", "3", "--moe-min-capacity", "5")  # one action: as for any flag
    assert a.moe_min_capacity == 5


def test_an_old_spelling_given_twice_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        a = parse("--min-capacity", "3", "--min-capacity", "5")
    assert a.moe_min_capacity == 5 and len(deprecation_warnings(caplog)) == 1


def test_an_old_spelling_is_checked_like_the_new_one():
    with pytest.raises(SystemExit):  # argparse's "invalid choice" for either spelling
        parse("--noisy-gate-policy", "Gumbel")
    with pytest.raises(MoEArgumentError, match=r"^--moe-min-capacity -1: must be >= 0"):
        options_from_args(parse("--min-capacity", "-1"))


def test_a_checkpoint_of_a_run_with_old_spellings_loads_with_the_options(tmp_path):
    """A checkpoint saves fairseq's config of the parsed flags: new names only."""
    import torch
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    cfg = convert_namespace_to_omegaconf(
        parse("--min-capacity", "2", "--noisy-gate-policy", "Jitter")
    )
    saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # as fairseq's Trainer
    history = [{"criterion_name": "ModelAndBaseCriterion", "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None}, "num_updates": 0}]  # fmt: skip
    state = {"cfg": saved, "model": {}, "optimizer_history": history, "extra_state": {}}
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    model_cfg = checkpoint_utils.load_checkpoint_to_cpu(str(path))["cfg"].model
    opts = options_from_args(model_cfg)
    assert (opts.min_capacity, opts.noisy_gate_policy) == (2, "Jitter")
    assert not hasattr(model_cfg, "min_capacity") and not hasattr(model_cfg, "noisy_gate_policy")


def test_every_old_spelling_is_documented():
    from user.moe_options import FLAGS

    from conftest import REPO

    old = [(name, f.names[0]) for f in FLAGS for name in f.old]
    assert old, "the reference plugin's spellings are in the flag table"
    for page in ("README.md", "docs/moe-options.md"):
        text = (REPO / page).read_text()
        for name, new in old:
            assert f"`{name}" in text and f"`{new}" in text, f"{page} misses {name}"


# --------------------------------------------------------------------------- validate()


def refusal(a, **known):
    """The one-line message ``validate`` refuses ``a`` with."""
    with pytest.raises(MoEArgumentError) as e:
        validate(a, **known)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
@pytest.mark.parametrize("dest", ["moe_capacity_factor", "moe_eval_capacity_factor"])
def test_capacity_factor_must_be_finite_and_positive(dest, value):
    a = args(deepspeed_moe="enc", num_experts=4, **{dest: value})
    flag = "--" + dest.replace("_", "-")
    assert refusal(a).startswith(f"{flag} {value}: must be a finite positive number")


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan")])
@pytest.mark.parametrize("dest", ["moe_eom", "moe_expert_dropout"])
def test_masking_and_dropout_rates_must_be_probabilities(dest, value):
    a = args(deepspeed_moe="enc", num_experts=4, **{dest: value})
    flag = "--" + dest.replace("_", "-")
    assert refusal(a) == f"{flag} {value}: must be a probability, 0 <= P < 1"


def test_router_options_are_off_by_default_and_take_their_values():
    opts = options_from_args(args(deepspeed_moe="enc"))
    assert (opts.z_loss, opts.eom, opts.expert_dropout) == (False, 0.0, None)
    given = args(deepspeed_moe="enc", moe_z_loss=True, moe_eom=0.2, moe_expert_dropout=0.0)
    opts = options_from_args(given)
    assert (opts.z_loss, opts.eom, opts.expert_dropout) == (True, 0.2, 0.0)


def criterion_args(weights, moe=True):
    return Namespace(
        criterion="model_and_base",
        loss_weights=weights,
        base_criterion="label_smoothed_cross_entropy",
        base_criterion_config="{}",
        deepspeed_moe="enc" if moe else "",
    )


@pytest.mark.parametrize(
    "weights,moe,message",
    [
        ('{"base_crit": 0, "experts_gate_loss": 0}', True, "every loss a zero or null weight"),
        ('{"base_crit": null, "experts_gate_loss": null}', True, "every loss a zero or null"),
        ('{"base_crit": 0, "experts_gate_loss": null}', True, "every loss a zero or null"),
        ('{"base_crit": 0}', False, "every loss a zero or null weight"),
        ('{"base_crit": -1}', True, "the weight of 'base_crit' must be >= 0, got -1"),
        ('{"experts_gate_loss": -0.01}', True, "the weight of 'experts_gate_loss' must be >= 0"),
    ],
)
def test_loss_weights_that_train_nothing_are_refused_before_any_work(weights, moe, message):
    assert message in refusal(criterion_args(weights, moe))


@pytest.mark.parametrize(
    "weights", ['{"experts_gate_loss": 0}', '{"base_crit": 0, "experts_gate_loss": 0.01}']
)
def test_loss_weights_with_something_to_train_pass(weights):
    validate(criterion_args(weights))  # base_crit weighs 1 unless given


def test_legacy_ddp_under_its_fairseq_alias_is_accepted():
    a = args(deepspeed_moe="enc", num_experts=4, ep_world_size=2, distributed_world_size=2)
    a.ddp_backend = "no_c10d"  # fairseq's other name for legacy_ddp
    validate(a, world=2)
    a.ddp_backend = "c10d"  # pytorch_ddp's alias: averages the rank-local experts
    assert "needs --ddp-backend legacy_ddp (got c10d)" in refusal(a, world=2)


def test_training_without_a_batch_size_is_refused():
    a = Namespace(max_tokens=None, batch_size=None)
    assert refusal(a, command="train").startswith("give --max-tokens N or --batch-size N")
    validate(a, command="generate")  # fairseq-generate has a default (12000 tokens)
    validate(Namespace(max_tokens=None, batch_size=8), command="train")


def test_a_missing_checkpoint_of_path_is_named(tmp_path):
    present = tmp_path / "a.pt"
    present.write_bytes(b"")
    missing = tmp_path / "checkpoint_bset.pt"
    assert refusal(Namespace(path=str(missing))).startswith(f"--path: {missing} does not exist")
    message = refusal(Namespace(path=f"{present}:{missing}"))
    assert (
        message.startswith(f"--path: {missing} does not exist") and "(checkpoint 2 of 2)" in message
    )
    assert "has a.pt" in message  # what is there, for a typo
    validate(Namespace(path=str(present)))


def fake_databin(path, langs=("de", "en")):
    path.mkdir()
    for lang in langs:
        (path / f"dict.{lang}.txt").write_text("a 1\n")
    return path


def test_every_shard_of_the_data_path_is_checked(tmp_path):
    first, second = fake_databin(tmp_path / "d1"), tmp_path / "d2"
    data = Namespace(data=f"{first}:{second}", source_lang="en", target_lang="de")
    message = refusal(data, task="translation_deepspeed")
    assert message.startswith(f"data directory {second} (shard 2 of 2) does not exist")
    # fairseq reads the dictionaries from the first shard only: a later one needs none
    fake_databin(second, langs=())
    validate(data, task="translation_deepspeed")
    (first / "dict.de.txt").unlink()
    message = refusal(data, task="translation_deepspeed")
    assert message.startswith(f"--target-lang de: {first} has no dict.de.txt")


def save(path, state):
    import torch

    torch.save(state, path)
    return path


def test_an_ensemble_of_expert_parallel_checkpoints_on_several_processes(tmp_path):
    from user.checkpoint.format import SHARD_KEY

    ep2 = save(tmp_path / "ep2.pt", {"model": {}, "extra_state": {SHARD_KEY: {"ep_size": 2}}})
    dense = save(tmp_path / "ep1.pt", {"model": {}, "extra_state": {}})
    ensemble = Namespace(path=f"{dense}:{ep2}")
    message = refusal(ensemble, world=2)
    assert message.startswith(f"--path: an ensemble with the expert-parallel checkpoint {ep2}")
    validate(ensemble, world=1)  # one process consolidates each checkpoint as it loads
    validate(Namespace(path=str(ep2)), world=2)  # one checkpoint: lockstep decoding
    validate(Namespace(path=f"{dense}:{dense}"), world=2)


def test_upcycle_from_a_file_that_is_no_dense_checkpoint(tmp_path):
    import torch

    dense = {"model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2)}}
    good = save(tmp_path / "dense.pt", dense)
    validate(Namespace(upcycle_from=str(good)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:100])
    assert refusal(Namespace(upcycle_from=str(bad))).startswith(
        f"--upcycle-from: cannot read checkpoint {bad} ("
    )
    moe = save(tmp_path / "moe.pt", {"model": {"encoder.layers.0.moe_ffn.moe.x": torch.zeros(1)}})
    message = refusal(Namespace(upcycle_from=str(moe)))
    assert message.startswith(f"--upcycle-from {moe}: this checkpoint already has MoE layers")
    junk = save(tmp_path / "junk.pt", [1, 2])
    assert "is not a fairseq checkpoint" in refusal(Namespace(upcycle_from=str(junk)))


def test_restore_file_missing_as_given_and_in_save_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    ours = {"task": "translation_deepspeed"}
    a = Namespace(restore_file="checkpoint_3_30.pt", save_dir=str(save_dir), checkpoint_suffix="")
    message = refusal(a, **ours)
    assert message.startswith("--restore-file checkpoint_3_30.pt: no such file, neither as given")
    assert str(save_dir) in message and "give the full path of a checkpoint" in message
    for name in ("checkpoint_1_10.pt", "checkpoint_2_20.pt", "checkpoint_1_9.pt"):
        (save_dir / name).write_bytes(b"")
    assert f"--restore-file {save_dir / 'checkpoint_2_20.pt'}" in refusal(a, **ours)
    # in --save-dir only: accepted (the trainer's load resolves it, see test_reliability)
    in_save_dir = Namespace(restore_file="checkpoint_1_10.pt", save_dir=str(save_dir))
    validate(in_save_dir, **ours)
    # ... by this task only: under another, fairseq would not find it and start from 0
    message = refusal(in_save_dir, task="translation")
    assert message.startswith("--restore-file checkpoint_1_10.pt: no such file, (read as given)")
    # as given (relative to the current directory)
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    validate(Namespace(restore_file="elsewhere.pt", save_dir=str(save_dir)), task="translation")
    # fairseq's default: absent means a fresh start
    fresh = Namespace(restore_file="checkpoint_last.pt", save_dir=str(tmp_path / "new"))
    validate(fresh, **ours)


@pytest.mark.parametrize(
    "sides,dest,flag",
    [
        ("enc", "encoder_layerdrop", "--encoder-layerdrop"),
        ("dec", "decoder_layerdrop", "--decoder-layerdrop"),
    ],
)
def test_layerdrop_on_an_expert_parallel_side_is_refused(sides, dest, flag):
    a = args(deepspeed_moe=sides, num_experts=4, ep_world_size=2, **{dest: 0.2})
    assert refusal(a).startswith(f"{flag} 0.2 does not work with --ep-world-size 2: ")
    validate(args(deepspeed_moe=sides, num_experts=4, **{dest: 0.2}))  # one expert-parallel rank
    other = "dec" if sides == "enc" else "enc"  # LayerDrop on the dense side only
    validate(args(deepspeed_moe=other, num_experts=4, ep_world_size=2, **{dest: 0.2}))
