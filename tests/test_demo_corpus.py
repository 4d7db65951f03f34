# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Tests of the bundled LibreOffice demo corpus and of its prepare entry point."""

import subprocess
import sys
from pathlib import Path

import pytest

import mt_prep
from scripts import build_demo_corpus, prepare_demo

REPO = Path(__file__).resolve().parents[1]

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def corpus():
    return {(s, l): prepare_demo.demo_lines(s, l) for s in SPLITS for l in ("en", "de")}


@pytest.mark.timeout(30)
def test_bundled_corpus_is_parallel_and_held_out_sets_do_not_leak(corpus):
    assert (REPO / "data" / "demo" / "README.md").exists()
    assert "MPL-2.0" in (REPO / "data" / "demo" / "README.md").read_text()
    for split in SPLITS:
        assert len(corpus[split, "en"]) == len(corpus[split, "de"])
        assert all(line.strip() for key in [(split, "en"), (split, "de")] for line in corpus[key])
    assert len(corpus["valid", "en"]) == len(corpus["test", "en"]) == 1000
    assert len(corpus["train", "en"]) > 40000
    for lang in ("en", "de"):
        train = set(corpus["train", lang])
        valid, test = set(corpus["valid", lang]), set(corpus["test", lang])
        assert not train & valid and not train & test and not valid & test
        assert len(valid) == len(test) == 1000  # no side repeated inside a held-out set


@pytest.mark.timeout(10)
def test_builder_helpers():
    parser = build_demo_corpus.HelpParagraphParser()
    parser.feed(
        '<p id="par_id1" class="paragraph">Choose <span class="switchinline">'
        '<span hidden="true" id="MAC1" class="MAC">LibreOffice - Preferences</span>'
        '<span hidden="true" id="default1">Tools - Options</span></span>'
        ' &amp; more<br>next</p><p id="other">skipped</p>'
    )
    assert parser.paragraphs == {"par_id1": "Choose Tools - Options & more next"}
    assert build_demo_corpus.strip_ui_markup("~Open %PRODUCTNAME file") == "Open LibreOffice file"
    assert build_demo_corpus.strip_ui_markup("_Save As") == "Save As"
    assert not build_demo_corpus.keep_pair("%1", "%1 ")
    assert not build_demo_corpus.keep_pair("OK", "OK")
    assert build_demo_corpus.keep_pair("Open file", "Datei öffnen")
    pairs = [(f"Sentence number {i} is here.", f"Satz Nummer {i} ist hier.") for i in range(30)]
    # Every sentence also occurs in a second pair with another translation, so
    # each held-out sentence has a twin that must be removed from train.
    pairs += [(f"Sentence number {i} is here.", f"Noch ein Satz {i}") for i in range(30)]
    pairs += [(f"Another one {i}", f"Satz Nummer {i} ist hier.") for i in range(30)]
    splits = build_demo_corpus.split_corpus(pairs, n_valid=5, n_test=5, seed=1)
    assert len(splits["valid"]) == len(splits["test"]) == 5
    for side in (0, 1):
        held = {p[side] for s in ("valid", "test") for p in splits[s]}
        assert len(held) == 10 and not held & {p[side] for p in splits["train"]}
    assert len(splits["train"]) == 90 - 10 - 2 * 10


@pytest.mark.timeout(30)
def test_copy_source_baseline(corpus):
    bleu = prepare_demo.copy_baseline_bleu("en", "de")
    assert 0.5 < bleu.score < 10, bleu
    assert mt_prep.copy_source_bleu(
        corpus["test", "de"], corpus["test", "de"]
    ).score == pytest.approx(100)


@pytest.mark.timeout(180)
def test_prepare_demo_slice_binarizes(tmp_path, corpus):
    from fairseq.data import Dictionary, data_utils

    out = tmp_path / "demo"
    # fmt: off
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_demo.py"), "--out", str(out),
           "--max-lines", "2000", "--vocab-size", "400", "--workers", "2"]
    # fmt: on
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-5000:]

    databin = out / "databin"
    assert (databin / "spm.model").exists() and (out / "spm" / "spm.model").exists()
    assert mt_prep.read_lines(str(out / "raw" / "test.de")) == corpus["test", "de"]
    n_train = mt_prep.count_lines(str(out / "clean" / "train.en"))
    assert 1500 < n_train <= 2000
    dictionary = Dictionary.load(str(databin / "dict.en.txt"))
    for split, n in (("train", n_train), ("valid", 1000), ("test", 1000)):
        for lang in ("en", "de"):
            ds = data_utils.load_indexed_dataset(str(databin / f"{split}.en-de.{lang}"), dictionary)
            assert ds is not None and len(ds) == n

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "step binarize: already done, skipping" in again.stderr
    assert ": running" not in again.stderr
