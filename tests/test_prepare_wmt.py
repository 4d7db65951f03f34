# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Tests of ``prepare-wmt16ende.sh`` against a loopback WMT mirror.

Tiny archives are built in the exact WMT16 layouts (tgz member paths,
``*.de-en.{de,en}`` names, SGML with ``<seg id=...>``) from lines of the
bundled demo corpus, served by ``http.server`` on 127.0.0.1, and the real
bash script is run against them. The mirror can cut a response midway or
serve a damaged archive, to exercise resume and integrity checks. Unit tests
of the pure helpers of ``mt_prep`` come first.
"""

import gzip
import hashlib
import html
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import mt_prep

REPO = Path(__file__).resolve().parents[1]

STEPS = ["fetch", "extract", "raw", "normalize", "clean", "spm_train", "encode", "binarize"]
N_EVAL = 100  # segments in the fake newstest sets


# ----------------------------------------------------------------------------
# Unit tests of the pure functions
# ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_parse_sgml_extracts_segments_in_order_and_unescapes():
    sgml = (
        '<srcset setid="newstest2014" srclang="any">\n<doc sysid="ref" docid="d1" genre="news">\n'
        '<p>\n<seg id="1"> Tom &amp; Jerry say &quot;hi&quot; &lt;3 </seg>\n'
        '<seg id="2">split\nover  lines</seg>\n</p>\n<hl>not a segment</hl>\n'
        "<SEG id=3>Ümlaut</SEG>\n</doc>\n</srcset>\n"
    )
    assert mt_prep.parse_sgml(sgml) == ['Tom & Jerry say "hi" <3', "split over lines", "Ümlaut"]


@pytest.mark.timeout(10)
def test_keep_pair_follows_clean_corpus_n():
    assert mt_prep.keep_pair("a b c", "x y")  # ratio exactly 1.5 is kept
    assert not mt_prep.keep_pair("a b c d", "x y")  # 2.0 > 1.5
    assert not mt_prep.keep_pair("x y", "a b c d")
    assert mt_prep.keep_pair("a b c d", "x y", ratio=2.0)
    assert not mt_prep.keep_pair("", "x")
    assert not mt_prep.keep_pair("   ", "x")
    assert mt_prep.keep_pair(" ".join(["w"] * 250), " ".join(["v"] * 250))
    assert not mt_prep.keep_pair(" ".join(["w"] * 251), " ".join(["v"] * 251))
    assert not mt_prep.keep_pair("a b", "x y", min_len=3)
    assert not mt_prep.keep_pair("a " + "b" * 1001, "x y")


@pytest.mark.timeout(10)
def test_heldout_split_takes_every_hundredth_line():
    train, valid = mt_prep.heldout_split(250)
    assert valid == [99, 199]
    assert len(train) == 248 and 99 not in train and 0 in train and 249 in train


@pytest.mark.timeout(10)
def test_remove_non_printing():
    # Control/format characters become spaces; all whitespace (no-break too) collapses.
    assert mt_prep.remove_non_printing("a\u200bb\x07c\u00a0d  e\t") == "a b c d e"


@pytest.mark.timeout(10)
def test_parse_checksums():
    text = "# known\n" + "AB" * 32 + "  dev.tgz\n" + "cd" * 32 + " *sub/test-full.tgz\n"
    assert mt_prep.parse_checksums(text) == {"dev.tgz": "ab" * 32, "test-full.tgz": "cd" * 32}


@pytest.mark.timeout(10)
def test_read_lines_keeps_unicode_line_separators():
    # U+2028 inside a sentence must not create an extra line (it would misalign sides).
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lines-{os.getpid()}.txt"
    path.write_text("a\u2028b\nc\n", encoding="utf-8")
    try:
        assert mt_prep.read_lines(str(path)) == ["a\u2028b", "c"]
    finally:
        path.unlink()


def _tgz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _damage(data):
    # Flip bytes in the middle of the deflate stream: gzip's CRC or zlib catch it.
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :]


@pytest.mark.timeout(10)
def test_check_archive_detects_truncation_damage_and_checksum(tmp_path):
    good = _tgz({"dir/a.txt": os.urandom(50000).hex().encode()})
    path = tmp_path / "x.tgz"
    path.write_bytes(good)
    assert mt_prep.check_archive(str(path)) == ["dir/a.txt"]
    assert mt_prep.check_archive(str(path), mt_prep.sha256_file(str(path))) == ["dir/a.txt"]
    with pytest.raises(mt_prep.CorruptArchiveError, match="sha256"):
        mt_prep.check_archive(str(path), "0" * 64)
    # A missing gzip trailer or a flipped byte is only caught by reading to the end.
    for bad in (good[: len(good) // 2], good[:-5], _damage(good), b""):
        path.write_bytes(bad)
        with pytest.raises(mt_prep.CorruptArchiveError):
            mt_prep.check_archive(str(path))


@pytest.mark.timeout(10)
def test_extract_members_matches_path_or_unique_basename(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_tgz({"./training/x.de": b"hallo\n", "other/y.en": b"hello\n"}))
    out = {"training/x.de": str(tmp_path / "x.de"), "moved/y.en": str(tmp_path / "y.en")}
    mt_prep.extract_members(str(archive), out)
    assert (tmp_path / "x.de").read_bytes() == b"hallo\n"
    assert (tmp_path / "y.en").read_bytes() == b"hello\n"
    with pytest.raises(mt_prep.CorruptArchiveError, match="no member"):
        mt_prep.extract_members(str(archive), {"missing.en": str(tmp_path / "m")})


@pytest.mark.timeout(10)
def test_pipeline_skips_done_steps_and_redoes_changed_ones(tmp_path):
    calls = []

    def step(name, value):
        out = tmp_path / name

        def fn():
            calls.append(name)
            mt_prep.write_lines(str(out), [str(value)])

        return str(out), fn

    def run(a, b):
        pipe = mt_prep.Pipeline(str(tmp_path))
        for name, value in (("a", a), ("b", b)):
            out, fn = step(name, value)
            pipe.run(name, {"v": value}, [out], fn)

    run(1, 1)
    assert calls == ["a", "b"]
    run(1, 1)
    assert calls == ["a", "b"]  # both skipped
    run(1, 2)
    assert calls == ["a", "b", "b"]  # only the changed step
    run(2, 2)
    assert calls == ["a", "b", "b", "a", "b"]  # a change upstream redoes downstream
    (tmp_path / "b").unlink()
    run(2, 2)
    assert calls[-1] == "b" and len(calls) == 6  # a missing output is rebuilt


@pytest.mark.timeout(10)
def test_failed_step_leaves_no_output_and_no_marker(tmp_path):
    out = tmp_path / "out.txt"

    def broken():
        with mt_prep.atomic_path(str(out)) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        mt_prep.Pipeline(str(tmp_path)).run("s", {}, [str(out)], broken)
    assert not out.exists()
    assert not (tmp_path / ".done" / "s").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != ".done"] == []


# ----------------------------------------------------------------------------
# A loopback WMT mirror
# ----------------------------------------------------------------------------


def _demo(split, lang, n, start=0):
    with gzip.open(REPO / "data" / "demo" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return f.read().split("\n")[start : start + n]


def _sgml(setid, lang, lines):
    segs = "".join(
        f'<seg id="{i}">{html.escape(s, quote=False)}</seg>\n' for i, s in enumerate(lines, 1)
    )
    return (
        f'<srcset setid="{setid}" srclang="any">\n<doc sysid="ref" docid="demo" genre="news" '
        f'origlang="{lang}">\n<p>\n{segs}</p>\n</doc>\n</srcset>\n'
    ).encode("utf-8")


# A pair that clean-corpus-n must drop (ratio 1:10), and one with an empty side.
BAD_PAIRS = [("Ratio", "eins zwei drei vier fünf sechs sieben acht neun zehn"), ("", "leer")]


@pytest.fixture(scope="module")
def wmt(tmp_path_factory):
    """Archives in WMT16 layout and the lines they contain."""
    en, de = _demo("train", "en", 1800), _demo("train", "de", 1800)
    en[5:5], de[5:5] = [p[0] for p in BAD_PAIRS], [p[1] for p in BAD_PAIRS]
    parts = {"europarl": (0, 802), "commoncrawl": (802, 1302), "news-commentary": (1302, 1802)}
    corpora = {name: {"en": en[a:b], "de": de[a:b]} for name, (a, b) in parts.items()}

    def text(lines):
        return "".join(line + "\n" for line in lines).encode("utf-8")

    dev = {lang: _demo("valid", lang, N_EVAL) for lang in ("en", "de")}
    test = {lang: _demo("test", lang, N_EVAL) for lang in ("en", "de")}
    archives = {
        "training-parallel-europarl-v7.tgz": _tgz(
            {
                f"training/europarl-v7.{pair}.{lang}": text(corpora["europarl"][lang])
                for pair in ("de-en",)
                for lang in ("de", "en")
            }
            | {"training/europarl-v7.fr-en.fr": b"bonjour\n"}
        ),
        "training-parallel-commoncrawl.tgz": _tgz(
            {
                f"commoncrawl.de-en.{lang}": text(corpora["commoncrawl"][lang])
                for lang in ("de", "en")
            }
            | {"commoncrawl.de-en.annotation": b"x\n" * 500}
        ),
        "training-parallel-nc-v11.tgz": _tgz(
            {
                f"training-parallel-nc-v11/news-commentary-v11.de-en.{lang}": text(
                    corpora["news-commentary"][lang]
                )
                for lang in ("de", "en")
            }
        ),
        "dev.tgz": _tgz(
            {
                **{
                    f"dev/newstest2013-{role}.{lang}.sgm": _sgml("newstest2013", lang, dev[lang])
                    for role in ("src", "ref")
                    for lang in ("en", "de")
                },
                "dev/newstest2015-ende-src.en.sgm": _sgml("newstest2015", "en", dev["en"][:3]),
                "dev/newstest2015-ende-ref.de.sgm": _sgml("newstest2015", "de", dev["de"][:3]),
            }
        ),
        "test-full.tgz": _tgz(
            {
                f"test-full/newstest2014-deen-{role}.{lang}.sgm": _sgml(
                    "newstest2014", lang, test[lang]
                )
                for role in ("src", "ref")
                for lang in ("en", "de")
            }
        ),
    }
    return {
        "archives": archives,
        "train": {"en": en[:1802], "de": de[:1802]},
        "dev": dev,
        "test": test,
    }


class Mirror:
    """A threaded HTTP server with Range support and scripted failures.

    ``plan[name]`` is a list of actions used by successive GETs of ``name``:
    ``"cut"`` sends the headers of the full body, half the body, then closes;
    a ``threading.Event`` sends half the body and hangs until it is set;
    ``bytes`` serves those bytes instead of the file. ``log`` records
    ``(name, range header, status)``.
    """

    def __init__(self, files):
        self.files, self.plan, self.log = files, {}, []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name not in mirror.files:
                    mirror.log.append((name, None, 404))
                    self.send_error(404)
                    return
                action = mirror.plan.get(name, []).pop(0) if mirror.plan.get(name) else None
                data = action if isinstance(action, bytes) else mirror.files[name]
                rng = self.headers.get("Range")
                start = int(re.match(r"bytes=(\d+)-$", rng).group(1)) if rng else 0
                status = 206 if rng else 200
                mirror.log.append((name, rng, status))
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if action == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif isinstance(action, threading.Event):
                    # stall: half the body, then hang until the test sets the event
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    action.wait(60)
                    self.close_connection = True
                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/wmt16"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def gets(self, name):
        return [entry for entry in self.log if entry[0] == name]


@pytest.fixture
def mirror(wmt):
    m = Mirror(wmt["archives"])
    m.thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()


def prepare_env(workspace, mirror, env):
    """``prepare-wmt16ende.sh``'s environment: the loopback mirror, a small vocabulary."""
    full_env = dict(os.environ)
    full_env.update(
        {
            "WORKSPACE": str(workspace),
            "WMT_MIRROR": mirror.url,
            "VOCAB_SIZE": "300",
            "WORKERS": "2",
            "RETRY_WAIT": "0.05",
            "DOWNLOAD_TIMEOUT": "20",
            "PYTHON": sys.executable,
        }
    )
    full_env.update({k: str(v) for k, v in env.items()})
    return full_env


def run_prepare(workspace, mirror, timeout=150, **env):
    return subprocess.run(
        ["bash", str(REPO / "prepare-wmt16ende.sh")],
        cwd=REPO,
        env=prepare_env(workspace, mirror, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen_prepare(workspace, mirror, **env):
    """``prepare-wmt16ende.sh`` started in its own process group, stderr piped."""
    return subprocess.Popen(
        ["bash", str(REPO / "prepare-wmt16ende.sh")],
        cwd=REPO,
        env=prepare_env(workspace, mirror, env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()


def tree(root):
    """``{relative path: bytes}`` of every file under ``root`` (markers included)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stderr


# ----------------------------------------------------------------------------
# End-to-end runs of the script
# ----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_end_to_end_en_de_binarizes_and_rerun_skips(tmp_path, mirror, wmt):
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    log = _ok(run_prepare(tmp_path, mirror))
    out = tmp_path / "wmt16_en_de"
    databin = out / "databin"
    assert sorted(n for n, _, _ in mirror.log) == sorted(wmt["archives"])

    # SGML dev/test became plain text with the right files for each side.
    assert mt_prep.read_lines(str(out / "raw" / "test.en")) == wmt["test"]["en"]
    assert mt_prep.read_lines(str(out / "raw" / "test.de")) == wmt["test"]["de"]
    assert mt_prep.read_lines(str(out / "raw" / "valid.de")) == wmt["dev"]["de"]
    assert mt_prep.read_lines(str(out / "raw" / "train.en")) == wmt["train"]["en"]

    clean_en = mt_prep.read_lines(str(out / "clean" / "train.en"))
    clean_de = mt_prep.read_lines(str(out / "clean" / "train.de"))
    assert len(clean_en) == len(clean_de) and 1500 < len(clean_en) < len(wmt["train"]["en"])
    assert "Ratio" not in clean_en and "leer" not in clean_de

    dictionary = Dictionary.load(str(databin / "dict.en.txt"))
    assert (databin / "dict.en.txt").read_text() == (databin / "dict.de.txt").read_text()
    sp = spm.SentencePieceProcessor(model_file=str(databin / "spm.model"))
    assert sp.get_piece_size() == 300
    expected = {"train": len(clean_en), "valid": N_EVAL, "test": N_EVAL}
    for split, n in expected.items():
        for lang in ("en", "de"):
            ds = data_utils.load_indexed_dataset(str(databin / f"{split}.en-de.{lang}"), dictionary)
            assert ds is not None and len(ds) == n == mt_prep.count_lines(
                str(out / "encoded" / f"{split}.{lang}")
            )
    test_de = data_utils.load_indexed_dataset(str(databin / "test.en-de.de"), dictionary)
    decoded = sp.decode(dictionary.string(test_de[3]).split())
    assert decoded == mt_prep.normalize_line(wmt["test"]["de"][3], "de")

    mtimes = {p.name: p.stat().st_mtime_ns for p in databin.iterdir()}
    n_requests = len(mirror.log)
    log = _ok(run_prepare(tmp_path, mirror))
    for step in STEPS:
        assert f"step {step}: already done, skipping" in log
    assert ": running" not in log
    assert len(mirror.log) == n_requests
    assert {p.name: p.stat().st_mtime_ns for p in databin.iterdir()} == mtimes


@pytest.mark.timeout(120)
def test_de_en_with_heldout_valid(tmp_path, mirror, wmt):
    log = _ok(
        run_prepare(tmp_path, mirror, SRC="de", TGT="en", VALID="heldout", STOP_AFTER="clean")
    )
    assert "stopped after step clean" in log and "step spm_train" not in log
    raw = tmp_path / "wmt16_de_en" / "raw"
    train_de = wmt["train"]["de"]
    assert mt_prep.read_lines(str(raw / "valid.de")) == train_de[99::100]
    assert mt_prep.read_lines(str(raw / "train.de")) == [
        s for i, s in enumerate(train_de) if (i + 1) % 100
    ]
    assert mt_prep.read_lines(str(raw / "test.de")) == wmt["test"]["de"]
    assert mt_prep.read_lines(str(raw / "test.en")) == wmt["test"]["en"]
    assert (tmp_path / "wmt16_de_en" / "clean" / "train.de").exists()


@pytest.mark.timeout(60)
def test_interrupted_downloads_resume_with_range(tmp_path, mirror, wmt):
    europarl = "training-parallel-europarl-v7.tgz"
    crawl = "training-parallel-commoncrawl.tgz"
    # A previous run was killed after 1000 bytes of Europarl...
    downloads = tmp_path / "wmt16_downloads"
    downloads.mkdir()
    (downloads / (europarl + ".part")).write_bytes(wmt["archives"][europarl][:1000])
    # ...and the mirror drops the Common Crawl connection halfway.
    mirror.plan[crawl] = ["cut"]

    log = _ok(run_prepare(tmp_path, mirror, STOP_AFTER="fetch"))
    assert mirror.gets(europarl) == [(europarl, "bytes=1000-", 206)]
    half = len(wmt["archives"][crawl]) // 2
    assert mirror.gets(crawl) == [(crawl, None, 200), (crawl, f"bytes={half}-", 206)]
    assert "resuming" in log and "interrupted" in log
    for name, data in wmt["archives"].items():
        assert (downloads / name).read_bytes() == data
        assert not (downloads / (name + ".part")).exists()


@pytest.mark.timeout(60)
def test_corrupt_archive_is_fetched_again(tmp_path, mirror, wmt):
    data = wmt["archives"]["dev.tgz"]
    mirror.plan["dev.tgz"] = [data[: len(data) - 200]]  # complete response, truncated archive
    log = _ok(run_prepare(tmp_path, mirror, STOP_AFTER="extract"))
    assert mirror.gets("dev.tgz") == [("dev.tgz", None, 200)] * 2
    assert "corrupt archive" in log
    assert (tmp_path / "wmt16_downloads" / "dev.tgz").read_bytes() == data
    assert (tmp_path / "wmt16_en_de" / "extracted" / "newstest2013.en.sgm").exists()


@pytest.mark.timeout(60)
def test_persistently_corrupt_archive_fails_clearly(tmp_path, mirror, wmt):
    bad = _damage(wmt["archives"]["dev.tgz"])
    mirror.plan["dev.tgz"] = [bad, bad]
    proc = run_prepare(tmp_path, mirror)
    assert proc.returncode == 1
    assert "corrupt again after a fresh download" in proc.stderr and "dev.tgz" in proc.stderr
    assert len(mirror.gets("dev.tgz")) == 2
    assert not (tmp_path / "wmt16_en_de" / ".done" / "fetch").exists()
    assert not (tmp_path / "wmt16_en_de" / "extracted" / "newstest2013.en.sgm").exists()


@pytest.mark.timeout(60)
def test_checksum_mismatch_is_reported(tmp_path, mirror):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("0" * 64 + "  test-full.tgz\n")
    proc = run_prepare(tmp_path, mirror, WMT_CHECKSUMS=sums, STOP_AFTER="fetch")
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "test-full.tgz" in proc.stderr


@pytest.mark.timeout(90)
def test_checksums_given_after_the_first_download_are_checked(tmp_path, mirror, wmt):
    _ok(run_prepare(tmp_path, mirror, STOP_AFTER="fetch"))
    requests = len(mirror.log)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in wmt["archives"].items())
    )
    log = _ok(run_prepare(tmp_path, mirror, WMT_CHECKSUMS=sums, STOP_AFTER="fetch"))
    assert "step fetch: already done, skipping" in log and len(mirror.log) == requests
    # the fetch step is done, but the archive on disk does not have this digest
    sums.write_text("0" * 64 + "  test-full.tgz\n")
    proc = run_prepare(tmp_path, mirror, WMT_CHECKSUMS=sums, STOP_AFTER="fetch")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sha256" in proc.stderr and "test-full.tgz" in proc.stderr
    assert len(mirror.gets("test-full.tgz")) == 2, "fetched once more before giving up"


@pytest.mark.timeout(120)
def test_an_archive_replaced_on_disk_is_checked_and_extracted_again(tmp_path, mirror, wmt):
    _ok(run_prepare(tmp_path, mirror, STOP_AFTER="extract"))
    archive = tmp_path / "wmt16_downloads" / "dev.tgz"
    sgm = tmp_path / "wmt16_en_de" / "extracted" / "newstest2013.en.sgm"
    before = sgm.read_bytes()
    # the same bytes written again (a new mtime): checked again, nothing to redo
    archive.write_bytes(archive.read_bytes())
    log = _ok(run_prepare(tmp_path, mirror, STOP_AFTER="extract"))
    assert "step extract: already done, skipping" in log
    # another dev set in its place: extracted again
    other = {lang: [f"{lang} {i}" for i in range(N_EVAL)] for lang in ("en", "de")}
    archive.write_bytes(
        _tgz(
            {
                f"dev/newstest2013-{role}.{lang}.sgm": _sgml("newstest2013", lang, other[lang])
                for role in ("src", "ref")
                for lang in ("en", "de")
            }
        )
    )
    log = _ok(run_prepare(tmp_path, mirror, STOP_AFTER="extract"))
    assert "step extract: running" in log
    assert sgm.read_bytes() == _sgml("newstest2013", "en", other["en"])
    # a damaged one: fetched from the mirror again, and extracted
    archive.write_bytes(_damage(archive.read_bytes()))
    requests = len(mirror.gets("dev.tgz"))
    log = _ok(run_prepare(tmp_path, mirror, STOP_AFTER="extract"))
    assert "corrupt archive" in log and len(mirror.gets("dev.tgz")) == requests + 1
    assert archive.read_bytes() == wmt["archives"]["dev.tgz"] and sgm.read_bytes() == before


#: sitecustomize for one run: sentencepiece waits TEST_SLOW_ENCODE seconds before each
#: encode call, so that a step's half-written output lasts long enough to be seen
SLOW_ENCODE = """import os, time
if os.environ.get("TEST_SLOW_ENCODE"):
    import sentencepiece
    _encode = sentencepiece.SentencePieceProcessor.encode
    def encode(self, *args, **kwargs):
        open(os.environ["TEST_SLOW_ENCODE_MARK"], "a").close()  # (the test sees it ran)
        time.sleep(float(os.environ["TEST_SLOW_ENCODE"]))
        return _encode(self, *args, **kwargs)
    sentencepiece.SentencePieceProcessor.encode = encode
"""


@pytest.mark.timeout(420)
def test_sigkill_mid_download_and_mid_steps_then_rerun_gives_identical_output(
    tmp_path, mirror, wmt
):
    # (same workspace path for both runs: spm.model records its input's path)
    work = tmp_path / "ws"
    _ok(run_prepare(work, mirror))
    reference = tree(work)
    shutil.rmtree(work)

    # SIGKILL while an archive is half downloaded: the mirror stalls mid-body.
    archive = "training-parallel-nc-v11.tgz"
    stall = threading.Event()
    mirror.plan[archive] = [stall]
    proc = popen_prepare(work, mirror)
    deadline = time.time() + 120
    while not any(name == archive for name, _, _ in mirror.log[-1:]):
        assert proc.poll() is None and time.time() < deadline, "the download never started"
        time.sleep(0.05)
    time.sleep(0.5)  # the client is reading the body the mirror holds back
    assert proc.poll() is None
    kill_group(proc)
    stall.set()
    assert not (work / "wmt16_downloads" / archive).exists()

    # SIGKILL inside each of these steps; encode and binarize once their
    # temporary outputs are half written (binarize: by fairseq-preprocess, a child).
    # Encoding this corpus can take less than the poll below: its run gets a
    # sentencepiece that waits before each batch (sitecustomize, this test's only).
    slow = tmp_path / "slow_encode"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_ENCODE)
    slow_env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])),
        "TEST_SLOW_ENCODE": "0.5",
        "TEST_SLOW_ENCODE_MARK": str(slow / "ran"),
    }
    out = work / "wmt16_en_de"
    partial = {
        "encode": lambda: list((out / "encoded").glob("*.tmp*")),
        "binarize": lambda: [p for d in out.glob("databin.tmp*") for p in d.glob("*.bin")],
    }
    for step in ("extract", "clean", "spm_train", "encode", "binarize"):
        proc = popen_prepare(work, mirror, **(slow_env if step == "encode" else {}))
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if f"step {step}: running" in line:
                break
        else:
            pytest.fail(f"step {step} never ran:\n{''.join(seen)[-3000:]}")
        deadline = time.time() + 60
        while step in partial and not partial[step]():
            assert proc.poll() is None and time.time() < deadline, (
                f"no partial output in step {step}"
            )
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before the kill in step {step}"
        kill_group(proc)
        if step == "encode":
            assert (slow / "ran").exists(), "the slowed-down sentencepiece was not used"
    assert list(out.glob("databin.tmp*")), "the kill in binarize left its temporary directory"

    log = _ok(run_prepare(work, mirror))
    assert "step binarize: running" in log
    after = tree(work)
    assert not [p for p in work.rglob("*") if ".tmp" in p.name or p.name == ".spm_tmp"]
    assert sorted(after) == sorted(reference)
    # preprocess.log names fairseq-preprocess's temporary directory (a process id); the
    # archives' check records name their mtimes
    differ = [name for name in after if after[name] != reference[name] and ".verified" not in name]
    assert differ in ([], ["wmt16_en_de/databin/preprocess.log"]), differ
