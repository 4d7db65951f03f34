# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Tests of ``scripts/sacrebleu.sh`` and of ``mt_prep.bleu`` behind it:
parsing a hand-written ``fairseq-generate`` output, and the script end to end
on a plain reference file against ``sacrebleu.corpus_bleu`` computed directly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from mt_prep import bleu

REPO = Path(__file__).resolve().parents[1]

# ids shuffled (as generate prints them, by batch), S-/T-/H-/P- lines and logs
# mixed in, hypotheses still in sentencepiece pieces, one empty hypothesis
GEN_OUTPUT = """\
2026-01-01 00:00:00 | INFO | fairseq_cli.generate | loading model(s)
S-2\t\u2581The \u2581cell \u2581is \u2581empty .
T-2\t\u2581Die \u2581Zelle \u2581ist \u2581leer .
H-2\t-0.31\t\u2581Die \u2581Zelle \u2581ist \u2581leer .
D-2\t-0.31\t\u2581Die \u2581Zelle \u2581ist \u2581leer .
P-2\t-0.1 -0.2 -0.3 -0.4 -0.5 -0.6
S-0\t\u2581Click \u2581OK .
H-0\t-0.52\t\u2581Klicken \u2581Sie \u2581auf \u2581OK .
D-0\t-0.52\t\u2581Klicken \u2581Sie \u2581auf \u2581OK .
H-3\t-1.20\t
D-3\t-1.20\t
H-1\t-0.44\t\u2581Format vor lage \u2581( Standard )
D-1\t-0.44\t\u2581Format vor lage \u2581( Standard )
2026-01-01 00:00:01 | INFO | fairseq_cli.generate | Translated 4 sentences (20 tokens)
Generate test with beam=4: BLEU4 = 42.00, 70.0/50.0/40.0/30.0 (BP=1.000, ratio=1.000, syslen=20, reflen=20)
"""
EXPECTED = ["Klicken Sie auf OK.", "Formatvorlage (Standard)", "Die Zelle ist leer.", ""]
REFS = ["Klicken Sie auf OK.", "Formatvorlage (Standard)", "Die Zelle ist nicht leer.", "Speichern"]


def run_script(*args, env=None, timeout=60, **kwargs):
    """Run ``bash scripts/sacrebleu.sh ARGS`` with this interpreter and ``env`` added;
    return the CompletedProcess."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "sacrebleu.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


@pytest.mark.timeout(10)
def test_parse_sorts_by_id_prefers_d_lines_and_joins_pieces():
    hyps = bleu.parse_generate_output(GEN_OUTPUT.splitlines(keepends=True))
    assert len(hyps) == 4 and hyps[3] == ""
    assert hyps[0].startswith("\u2581Klicken")
    assert bleu.detokenize(hyps) == EXPECTED


@pytest.mark.timeout(10)
def test_parse_falls_back_to_h_lines_and_keeps_first_nbest():
    text = "H-1\t-0.2\tzwei\nH-0\t-0.1\teins\nH-0\t-0.9\tnicht das beste\n"
    assert bleu.parse_generate_output(text.splitlines()) == ["eins", "zwei"]


@pytest.mark.timeout(10)
def test_already_decoded_text_is_left_as_is():
    # generate --bpe sentencepiece: D- lines are plain text, spaces must stay
    text = (
        "D-0\t-0.1\tKlicken Sie auf OK.\nH-0\t-0.1\t\u2581Klicken \u2581Sie \u2581auf \u2581OK .\n"
    )
    hyps = bleu.parse_generate_output(text.splitlines())
    assert bleu.detokenize(hyps) == ["Klicken Sie auf OK."]
    assert bleu.join_pieces("\u2581Hal lo \u2581Welt .") == "Hallo Welt."


@pytest.mark.timeout(10)
def test_parse_rejects_missing_ids_and_non_generate_files():
    with pytest.raises(bleu.ScoringError, match="first missing id: 1"):
        bleu.parse_generate_output(["D-0\t-0.1\ta", "D-2\t-0.1\tc"])
    with pytest.raises(bleu.ScoringError, match="no D-<id> or H-<id>"):
        bleu.parse_generate_output(["just text", "S-0\tsource"])


@pytest.mark.timeout(60)
def test_script_matches_sacrebleu_on_a_plain_reference(tmp_path):
    gen, ref, hyp_out = tmp_path / "gen.txt", tmp_path / "ref.de", tmp_path / "hyp.de"
    gen.write_text(GEN_OUTPUT, encoding="utf-8")
    ref.write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    proc = run_script(gen, ref, "--write-hyp", hyp_out)
    assert proc.returncode == 0, proc.stderr
    expected = sacrebleu.corpus_bleu(EXPECTED, [REFS])
    line = proc.stdout.strip()
    assert line.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:"), line
    assert line.split(" = ")[1].split()[0] == f"{expected.score:.2f}"
    assert f"hyp_len = {expected.sys_len} ref_len = {expected.ref_len}" in line
    assert 0 < expected.score < 100
    assert hyp_out.read_text(encoding="utf-8").splitlines() == EXPECTED


@pytest.mark.timeout(60)
def test_script_fails_clearly_on_a_count_mismatch(tmp_path):
    gen, ref = tmp_path / "gen.txt", tmp_path / "ref.de"
    gen.write_text(GEN_OUTPUT, encoding="utf-8")
    ref.write_text("".join(r + "\n" for r in REFS + ["one line too many"]), encoding="utf-8")
    proc = run_script(gen, ref)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "4 hypotheses but 5 reference lines" in proc.stderr


@pytest.mark.timeout(30)
def test_script_usage_and_test_set_needs_languages(tmp_path):
    proc = run_script()
    assert proc.returncode == 2 and "Usage: bash scripts/sacrebleu.sh" in proc.stderr
    gen = tmp_path / "gen.txt"
    gen.write_text(GEN_OUTPUT, encoding="utf-8")
    proc = run_script(gen, "wmt14/full")
    assert proc.returncode == 2 and "needs SRC_LANG TGT_LANG" in proc.stderr
    proc = run_script(gen, tmp_path / "no-such-file")
    assert proc.returncode == 2 and "neither a file nor a sacrebleu test set" in proc.stderr


def write_gen_and_ref(folder, ref_name="ref.de"):
    gen, ref = folder / "gen.txt", folder / ref_name
    gen.write_text(GEN_OUTPUT, encoding="utf-8")
    ref.write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    return gen, ref


@pytest.mark.timeout(60)
def test_script_takes_the_reference_plugins_order_too(tmp_path):
    # the reference plugin's order: TEST_SET SRC TGT GEN_OUTPUT (here a plain reference file)
    gen, ref = write_gen_and_ref(tmp_path)
    ours = run_script(gen, ref, "en", "de")
    theirs = run_script(ref, "en", "de", gen)
    assert ours.returncode == 0 and ours.stdout.startswith("BLEU|"), ours.stderr
    assert theirs.returncode == 0 and theirs.stdout == ours.stdout, theirs.stderr
    expected = sacrebleu.corpus_bleu(EXPECTED, [REFS]).score
    assert ours.stdout.split(" = ")[1].split()[0] == f"{expected:.2f}"
    # the generate output through a pipe (bash's <(...)), in the reference's order
    script = REPO / "scripts" / "sacrebleu.sh"
    piped = subprocess.run(
        ["bash", "-c", 'bash "$0" "$1" en de <(cat "$2")', script, ref, gen],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stdout == ours.stdout, piped.stderr
    # a missing reference is named as such in either order
    for args in ((tmp_path / "no.de", "en", "de", gen), (gen, tmp_path / "no.de", "en", "de")):
        proc = run_script(*args)
        assert proc.returncode == 2 and "no.de' is neither a file nor a sacrebleu" in proc.stderr


@pytest.mark.timeout(60)
def test_script_refuses_an_order_it_cannot_tell(tmp_path):
    # a reference file named "de" and a generate output named "de": either order reads
    gen, _ = write_gen_and_ref(tmp_path, ref_name="de")
    proc = run_script("gen.txt", "de", "en", "de", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "cannot tell the argument order" in line and "'./de' if 'de' is your reference" in line
    proc = run_script("gen.txt", "./de", "en", "de", cwd=tmp_path)  # the fix it names
    assert proc.returncode == 0 and proc.stdout.startswith("BLEU|"), proc.stderr


@pytest.mark.timeout(90)
def test_script_says_how_to_score_offline_when_the_download_fails(tmp_path):
    # an empty sacrebleu cache and a proxy that refuses: the download fails, network or not
    gen, _ = write_gen_and_ref(tmp_path)
    cache = tmp_path / "cache"
    dead = "http://127.0.0.1:9"
    env = {"SACREBLEU": str(cache), "http_proxy": dead, "https_proxy": dead, "no_proxy": ""}
    env.update({k.upper(): v for k, v in env.items() if k.endswith("proxy")})
    for args in ((gen, "wmt14/full", "en", "de"), ("wmt14/full", "en", "de", gen)):
        proc = run_script(*args, env=env, timeout=60)
        assert proc.returncode == 2 and proc.stdout == ""
        (line,) = proc.stderr.splitlines()  # one line, no traceback
        assert "could not download the test set wmt14/full (en-de)" in line, line
        assert f"SACREBLEU={cache}" in line and "plain-text reference file" in line, line
    # a pair the test set lacks is no download failure
    proc = run_script(gen, "wmt14/full", "en", "xx", env=env, timeout=60)
    assert proc.returncode == 2 and "'wmt14/full' has no en-xx pair (it has: " in proc.stderr
