# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""No noise a user cannot act on: a real ``user/train.py`` and ``user/generate.py`` run,
with Python's warnings as a user sees them (no ``PYTHONWARNINGS``), print none of the
upstream messages the plugin silences (``user/noise.py``); a warning outside that list,
and the plugin's own warnings, still show."""

import logging
import re
import warnings

import pytest

from user import noise

from conftest import USER_DIR, run_cli
from test_cli import MODEL

# what these runs printed before the plugin silenced it, as a user saw it
NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed
    "Please install tensorboardX",  # fairseq's text_to_speech task
    "hydra.experimental.initialize() is no longer experimental",
    "The version_base parameter is not specified",
    "hydra.experimental.compose() is no longer experimental",
    "Usage of deprecated keyword in package header",
    "is validated against ConfigStore schema",
    "The strict flag in the compose API is deprecated",
    "Setting JobRuntime",  # hydra's DEBUG lines in generate
    "'pin_memory' argument is set as true but no accelerator is found",
    "`torch.cuda.amp.autocast(args...)` is deprecated",
    "Support for mismatched key_padding_mask and attn_mask is deprecated",
)
WARNING_LINE = re.compile(r"\b\w*Warning: ")


def test_each_entry_names_its_message_its_source_and_why():
    for n in noise.NOISE:
        assert n.reason and (n.category is None) != (n.logger is None), n
        re.compile(n.message)


def test_a_listed_message_is_silenced_from_its_source_only_and_a_users_filter_wins():
    mask = "Support for mismatched key_padding_mask and attn_mask is deprecated. Use ..."
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        noise.silence()
        noise.silence()  # idempotent
        warnings.warn_explicit(mask, UserWarning, "functional.py", 1, "torch.nn.functional")
        warnings.warn_explicit(mask, UserWarning, "functional.py", 1, "torch.nn.functional_x")
        warnings.warn_explicit(mask, UserWarning, "mine.py", 1, "mine")
        warnings.warn_explicit(mask, DeprecationWarning, "functional.py", 1, "torch.nn.functional")
        warnings.warn_explicit("another", UserWarning, "functional.py", 1, "torch.nn.functional")
        assert [(w.category, w.filename) for w in seen] == [
            (UserWarning, "functional.py"),  # the module is matched whole
            (UserWarning, "mine.py"),
            (DeprecationWarning, "functional.py"),
            (UserWarning, "functional.py"),
        ]
        warnings.simplefilter("error")  # as -W error: before the plugin's filters
        with pytest.raises(UserWarning):
            warnings.warn_explicit(mask, UserWarning, "functional.py", 1, "torch.nn.functional")

    def shown(name, level, message):
        record = logging.LogRecord(name, level, "x.py", 1, message, None, None)
        return bool(logging.getLogger(name).filter(record))

    assert not shown("hydra.core.utils", logging.DEBUG, "Setting JobRuntime:name=utils")
    assert shown("hydra.core.utils", logging.WARNING, "Setting JobRuntime:name=utils")
    assert shown("hydra.core.utils", logging.DEBUG, "Loaded config")
    assert shown("hydra.core", logging.DEBUG, "Setting JobRuntime:name=utils")
    bpe = "If you are using BPE on the target side, the BLEU score is computed on BPE tokens, ..."
    assert not shown("fairseq_cli.generate", logging.WARNING, bpe)  # fairseq's own BLEU line's
    assert shown("fairseq_cli.generate", logging.WARNING, "another warning")


def loud(args, **env):
    """``run_cli`` with Python's default warning filters (no ``PYTHONWARNINGS``)."""
    proc = run_cli(args, PYTHONWARNINGS=None, **env)
    return proc, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_train_and_generate_print_no_upstream_noise(tiny_data, tmp_path):
    db, save = tiny_data["databin"], tmp_path / "ckpt"
    train, out = loud(["python", USER_DIR / "train.py", db, *MODEL, "--save-dir", save,
                       "--max-update", "2", "--log-format", "simple"])  # fmt: skip
    assert "| train_inner |" in out and (save / "checkpoint_last.pt").exists()
    assert [n for n in NOISE if n in out] == [] and not WARNING_LINE.search(out), out[-6000:]
    gen, out = loud(["python", USER_DIR / "generate.py", db, "--path", save / "checkpoint_last.pt",
                     "--beam", "2", "--max-len-b", "4", "--batch-size", "8"])  # fmt: skip
    assert re.search(r"^H-0\t", gen.stdout, re.M), out[-3000:]
    assert [n for n in NOISE if n in out] == [] and not WARNING_LINE.search(out), out[-6000:]


# a test-only sitecustomize: at exit, one warning the list does not name, and one with a
# listed message from another module than the one the list names for it
SITECUSTOMIZE = """
import atexit, warnings

def _warn():
    warnings.warn("a warning outside the plugin's list", UserWarning)
    warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. x")

atexit.register(_warn)
"""


@pytest.mark.timeout(300)
def test_warnings_outside_the_list_and_the_plugins_own_still_show(tiny_data, tmp_path):
    import os

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    _, out = loud(["python", USER_DIR / "train.py", tiny_data["databin"], *MODEL,
                   "--save-dir", tmp_path / "ckpt", "--no-save", "--max-update", "1",
                   "--min-capacity", "4",  # the reference plugin's spelling: deprecated
                   "--loss-weights", '{"base_crit": 1, "experts_gate_loss": 2}'],
                  PYTHONPATH=path)  # fmt: skip
    assert "--min-capacity is deprecated" in out
    assert "--loss-weights: experts_gate_loss 2 is above 1" in out
    assert "UserWarning: a warning outside the plugin's list" in out, out[-3000:]
    assert "UserWarning: Support for mismatched key_padding_mask" in out, out[-3000:]
