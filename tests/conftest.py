# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Shared fixtures: the plugin imported once as ``--user-dir`` does, a tiny
binarized en-de dataset built once per session from the bundled demo corpus,
and helpers to run the real fairseq CLIs."""

import gzip
import os
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from mt_run import processes

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "user"
DEMO = REPO / "data" / "demo"
BIN = Path(sys.executable).parent

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _import_plugin():
    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=str(USER_DIR)))


_import_plugin()


def cli_env(**extra):
    """Environment for CLI subprocesses (no variable a user would have to set); ``extra``
    variables set to None are unset (``PYTHONWARNINGS=None``: Python's warnings as a user
    sees them)."""
    env = dict(os.environ)
    env.pop("DS_ACCELERATOR", None)  # the plugin must pick the CPU itself
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_cli(args, timeout=300, check=True, **env):
    """Run a CLI (``fairseq-train`` etc. from this venv); return the CompletedProcess.

    On ``timeout`` (or a pytest-timeout) its whole process tree is killed, torchrun's
    workers included (``mt_run.processes.run``)."""
    cmd = [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *map(str, args[1:])]
    proc = processes.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(**env), cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _tok(line):
    # lowercase words and punctuation split off: a simple reversible-enough tokenization
    return " ".join(re.findall(r"\w+|[^\w\s]", line.lower()))


def _read_pairs(split, limit, max_words=12):
    with (
        gzip.open(DEMO / f"{split}.en.gz", "rt", encoding="utf-8") as fe,
        gzip.open(DEMO / f"{split}.de.gz", "rt", encoding="utf-8") as fd,
    ):
        pairs = []
        for en, de in zip(fe, fd):
            en, de = _tok(en), _tok(de)
            if 0 < len(en.split()) <= max_words and 0 < len(de.split()) <= max_words:
                pairs.append((en, de))
            if len(pairs) == limit:
                break
    return pairs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny binarized en->de dataset (real sentences, joined dictionary).

    Returns:
        dict with ``databin`` (Path) and ``raw`` (Path holding ``{split}.{en,de}``).
    """
    root = tmp_path_factory.mktemp("tiny_data")
    raw = root / "raw"
    raw.mkdir()
    for split, n in (("train", 600), ("valid", 40), ("test", 24)):
        pairs = _read_pairs(split, n)
        (raw / f"{split}.en").write_text("".join(p[0] + "\n" for p in pairs), encoding="utf-8")
        (raw / f"{split}.de").write_text("".join(p[1] + "\n" for p in pairs), encoding="utf-8")
    databin = root / "databin"
    # fmt: off
    run_cli(
        [
            "fairseq-preprocess",
            "--source-lang", "en", "--target-lang", "de",
            "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
            "--destdir", databin, "--joined-dictionary", "--nwordssrc", "400", "--workers", "1",
        ]
    )
    # fmt: on
    return {"databin": databin, "raw": raw}


def train_py(databin, save, max_update, *extra, check=True):
    """``python user/train.py`` with the small MoE model of test_cli."""
    from test_cli import MODEL

    args = [databin, *MODEL, "--save-dir", save, "--max-update", max_update, *extra]
    return run_cli(["python", USER_DIR / "train.py", *args], check=check)


@pytest.fixture(scope="session")
def trained_once(tiny_data, tmp_path_factory):
    """The save dir of a 1-process run of test_cli's MoE model, 2 updates."""
    save = tmp_path_factory.mktemp("rel") / "ckpt"
    train_py(tiny_data["databin"], save, 2)
    return save


@pytest.fixture(scope="session")
def ep2_run(tiny_data, tmp_path_factory):
    """A 2-process expert-parallel training run (EP=2, 4 experts), 9 updates.

    Returns:
        dict with ``save`` (its save dir: checkpoint_last.pt and expert shards)
        and ``losses`` (``{update: loss}``).
    """
    from ep_helpers import train2

    save = tmp_path_factory.mktemp("ep2_run") / "ckpt"
    losses = train2(tiny_data["databin"], save, 9)
    return {"save": save, "losses": losses}
