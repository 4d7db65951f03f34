# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Shared machine-translation data preparation: fetch, clean, sentencepiece, binarize.

Used by ``prepare_wmt16.py`` (WMT16 En-De) and ``prepare_demo.py`` (the bundled
LibreOffice corpus) so that both go through the same pipeline from the clean
step on. It replaces the Moses perl scripts with sacremoses and sentencepiece's
Python API, and makes every step resumable:

- downloads resume with HTTP ``Range`` and are checked before extraction
  (the whole gzip/tar stream is read, and a sha256 is compared when known);
- every output is written under a temporary name and renamed when complete;
- a step writes a marker after its outputs exist; the marker holds a
  signature of the step's parameters and of all steps before it, so a rerun
  skips finished steps and redoes a step (and what follows) whose settings
  changed.

The functions near the top are pure and unit tested.
"""

import contextlib
import glob
import gzip
import hashlib
import html
import http.client
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.request
import zlib

logger = logging.getLogger("mt_prep")

SEG_RE = re.compile(r"<seg\b[^>]*>(.*?)</seg>", re.DOTALL | re.IGNORECASE)


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def parse_sgml(text):
    """Extract the segments of a WMT SGML file, in order, as plain text.

    Does what Moses' ``input-from-sgm.perl`` does, and also unescapes
    entities (``&amp;`` -> ``&``) and collapses whitespace.

    Args:
        text: content of a ``newstestYYYY-*.sgm`` file.

    Returns:
        list of segment strings, one per ``<seg id=...>``.
    """
    return [" ".join(html.unescape(seg).split()) for seg in SEG_RE.findall(text)]


def remove_non_printing(line):
    """Replace control and format characters by spaces, as Moses'
    ``remove-non-printing-char.perl`` does, then collapse all whitespace
    (no-break spaces included).

    Args:
        line: one line of text.
    """
    return " ".join(
        "".join(" " if unicodedata.category(c).startswith("C") else c for c in line).split()
    )


def keep_pair(src, tgt, min_len=1, max_len=250, ratio=1.5, max_word_len=1000):
    """Moses ``clean-corpus-n.perl`` rule for one sentence pair.

    Lengths are counted in whitespace-separated tokens.

    Args:
        src: source line.
        tgt: target line.
        min_len: fewest tokens on each side.
        max_len: most tokens on each side.
        ratio: largest allowed ratio of the longer to the shorter side.
        max_word_len: longest allowed token, in characters.

    Returns:
        True if the pair is kept.
    """
    s, t = src.split(), tgt.split()
    ns, nt = len(s), len(t)
    if ns < min_len or nt < min_len or ns > max_len or nt > max_len:
        return False
    if ns == 0 or nt == 0:
        return False
    if ns / nt > ratio or nt / ns > ratio:
        return False
    return all(len(w) <= max_word_len for w in s + t)


def heldout_split(n_lines, every=100):
    """Indices of a held-out validation slice, as fairseq's WMT example makes it.

    Line ``i`` (1-based) goes to valid when ``i % every == 0``.

    Args:
        n_lines: number of training lines.
        every: take every N-th line.

    Returns:
        ``(train_indices, valid_indices)``, 0-based.
    """
    valid = [i for i in range(n_lines) if (i + 1) % every == 0]
    held = set(valid)
    return [i for i in range(n_lines) if i not in held], valid


def signature(*parts):
    """Stable short hash of JSON-serialisable parts (a step's settings).

    Args:
        parts: values that determine a step's output.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def parse_checksums(text):
    """Parse ``sha256sum`` output into ``{file name: hex digest}``.

    Args:
        text: lines ``<hex>  <name>``; blank lines and ``#`` comments ignored.
    """
    sums = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            digest, name = line.split(None, 1)
            sums[os.path.basename(name.lstrip("*"))] = digest.lower()
    return sums


def copy_source_bleu(src_lines, ref_lines):
    """BLEU of the untranslated source used as hypothesis (a sanity baseline).

    A trained model must beat it by a wide margin; on corpora with many
    names, numbers and product terms it is far from zero.

    Args:
        src_lines: source sentences (the "hypothesis").
        ref_lines: reference translations.

    Returns:
        sacrebleu's ``BLEUScore``.
    """
    import sacrebleu

    assert len(src_lines) == len(ref_lines), f"{len(src_lines)} != {len(ref_lines)} lines"
    return sacrebleu.corpus_bleu(list(src_lines), [list(ref_lines)])


# ----------------------------------------------------------------------------
# Files and steps
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Args:
        path: final file or directory path.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    _remove(tmp)
    _remove_stale_tmp(path)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove_stale_tmp(path):
    """Remove ``path.tmp<pid>`` left by a killed run (a process that no longer exists)."""
    for old in glob.glob(glob.escape(path) + ".tmp*"):
        pid = old[len(path) + len(".tmp"):]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(old)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def read_lines(path):
    """Read a text file (``.gz`` transparently) into a list of lines without newlines.

    Args:
        path: file path.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    # Only "\n" ends a line: str.splitlines would also split on U+2028 and
    # misalign parallel files.
    if lines[-1] == "":
        lines.pop()
    return lines


def write_lines(path, lines):
    """Write lines atomically, one per line.

    Args:
        path: output path.
        lines: iterable of strings without newlines.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")


def count_lines(path):
    """Number of lines of a text file.

    Args:
        path: file path.
    """
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class Pipeline:
    """Runs named steps once, recording completion with marker files.

    Args:
        workdir: directory of the outputs; markers go to ``workdir/.done``.
        stop_after: name of the step after which ``run`` raises ``StopPipeline``.
    """

    def __init__(self, workdir, stop_after=None):
        self.workdir = workdir
        self.marker_dir = os.path.join(workdir, ".done")
        self.stop_after = stop_after
        self._chain = ""
        os.makedirs(self.marker_dir, exist_ok=True)

    def run(self, name, params, outputs, fn):
        """Run ``fn()`` unless step ``name`` already completed with the same settings.

        Args:
            name: step name (also the marker's file name).
            params: JSON-serialisable settings that determine the outputs.
            outputs: paths ``fn`` must create; all must exist for a skip.
            fn: callable doing the work, writing outputs atomically.
        """
        sig = signature(self._chain, name, params)
        self._chain = sig
        marker = os.path.join(self.marker_dir, name)
        done = os.path.exists(marker) and read_lines(marker) == [sig]
        if done and all(os.path.exists(p) for p in outputs):
            logger.info("step %s: already done, skipping", name)
        else:
            _remove(marker)
            logger.info("step %s: running", name)
            start = time.time()
            fn()
            missing = [p for p in outputs if not os.path.exists(p)]
            assert not missing, f"step {name} did not produce {missing}"
            write_lines(marker, [sig])
            logger.info("step %s: done in %.1fs", name, time.time() - start)
        if self.stop_after == name:
            raise StopPipeline(name)


class StopPipeline(Exception):
    """Raised after the step requested with ``--stop-after``."""


# ----------------------------------------------------------------------------
# Download and archives
# ----------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """A file could not be downloaded."""


class CorruptArchiveError(RuntimeError):
    """An archive failed its integrity check."""


def download(url, dest, attempts=5, timeout=60.0, backoff=1.0):
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with HTTP Range.

    A connection that breaks midway is retried from where it stopped, within
    this call and across runs (the ``.part`` file is kept). ``dest`` appears
    only once the body is complete.

    Args:
        url: http(s) or file URL.
        dest: final path.
        attempts: connection attempts before giving up.
        timeout: socket timeout in seconds.
        backoff: seconds to wait after the first failure (doubles each time).
    """
    part = dest + ".part"
    last_error = None
    for attempt in range(1, attempts + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": "fairseq-moe-prepare/1.0"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                length = resp.headers.get("Content-Length")
                if have and status == 206:
                    logger.info("resuming %s at byte %d", os.path.basename(dest), have)
                    mode = "ab"
                else:
                    have, mode = 0, "wb"
                total = have + int(length) if length is not None else None
                _copy_with_progress(resp, part, mode, have, total, os.path.basename(dest))
            size = os.path.getsize(part)
            if total is not None and size != total:
                raise DownloadError(f"connection closed at byte {size} of {total}")
            os.replace(part, dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                # The partial file is not a prefix the server can continue.
                logger.warning("server refused to resume %s; starting over", url)
                os.remove(part)
                last_error = e
            elif 400 <= e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            else:
                last_error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as e:
            last_error = e
        if attempt < attempts:
            wait = backoff * 2 ** (attempt - 1)
            logger.warning(
                "download of %s interrupted (%s); retry %d/%d in %.1fs",
                url, last_error, attempt, attempts - 1, wait,
            )
            time.sleep(wait)
    raise DownloadError(f"{url}: giving up after {attempts} attempts: {last_error}")


def _copy_with_progress(resp, path, mode, have, total, label, chunk=1 << 20):
    done, last_log = have, time.time()
    with open(path, mode) as f:
        while True:
            block = resp.read(chunk)
            if not block:
                break
            f.write(block)
            done += len(block)
            if time.time() - last_log > 10:
                last_log = time.time()
                if total:
                    logger.info("%s: %.1f%% of %.1f MB", label, 100 * done / total, total / 1e6)
                else:
                    logger.info("%s: %.1f MB", label, done / 1e6)


def sha256_file(path):
    """Hex sha256 of a file.

    Args:
        path: file path.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_archive(path, sha256=None):
    """Verify a ``.tgz``: optional checksum, then read every member to the end.

    Args:
        path: archive path.
        sha256: expected hex digest, or None when unknown.

    Returns:
        the member names.

    Raises:
        CorruptArchiveError: checksum mismatch, truncated or damaged stream.
    """
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise CorruptArchiveError(f"{path}: sha256 {actual} does not match expected {sha256}")
    names = []
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if is_gzip else raw
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    names.append(member.name)
                    if member.isfile():
                        f = tar.extractfile(member)
                        while f.read(1 << 20):
                            pass
            # tarfile stops at its end-of-archive blocks; only reading the
            # gzip stream to its end checks the CRC and length in the trailer.
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CorruptArchiveError(f"{path}: {type(e).__name__}: {e}") from e
    if not names:
        raise CorruptArchiveError(f"{path}: archive is empty")
    return names


def fetch_archive(url, dest, sha256=None, **download_kwargs):
    """Download and verify an archive, fetching it once more if it is corrupt.

    Args:
        url: where to get it.
        dest: local path.
        sha256: expected digest, or None.
        download_kwargs: passed to ``download``.

    Raises:
        CorruptArchiveError: the second copy is corrupt too.
    """
    for attempt in (1, 2):
        if not os.path.exists(dest):
            logger.info("downloading %s", url)
            download(url, dest, **download_kwargs)
        try:
            check_archive(dest, sha256)
            logger.info("%s: integrity check passed", os.path.basename(dest))
            return
        except CorruptArchiveError as e:
            os.remove(dest)
            if attempt == 2:
                raise CorruptArchiveError(
                    f"{e}\nThe archive is corrupt again after a fresh download from {url}; "
                    "check the mirror (WMT_MIRROR) or the checksum list."
                ) from e
            logger.warning("corrupt archive (%s); deleting it and fetching it again", e)


def _normalise_member(name):
    return name[2:] if name.startswith("./") else name


def extract_members(archive, wanted):
    """Extract selected members of a tar archive to chosen paths, atomically.

    A member is matched by its path, or else by its unique base name (mirrors
    sometimes repack archives with another top folder).

    Args:
        archive: tar path.
        wanted: ``{member path: destination path}``.
    """
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        by_name = {_normalise_member(m.name): m for m in members}
        for name, dest in wanted.items():
            member = by_name.get(name)
            if member is None:
                base = os.path.basename(name)
                candidates = [m for m in members if os.path.basename(m.name) == base]
                if len(candidates) != 1:
                    listing = ", ".join(sorted(by_name)[:20])
                    raise CorruptArchiveError(f"{archive}: no member {name} (has: {listing})")
                member = candidates[0]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with atomic_path(dest) as tmp:
                with tar.extractfile(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


# ----------------------------------------------------------------------------
# Cleaning, sentencepiece, binarization
# ----------------------------------------------------------------------------

_NORMALIZERS = {}


def normalize_line(line, lang, tokenize=False):
    """Moses-style normalisation of one line with sacremoses.

    Punctuation normalisation, removal of non-printing characters and, when
    asked, Moses tokenisation (aggressive dash splits, no XML escaping).

    Args:
        line: raw text.
        lang: language code.
        tokenize: apply the Moses tokenizer too.
    """
    tools = _NORMALIZERS.get((lang, tokenize))
    if tools is None:
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        tools = (MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang) if tokenize else None)
        _NORMALIZERS[(lang, tokenize)] = tools
    line = remove_non_printing(tools[0].normalize(line))
    if tools[1] is not None:
        line = tools[1].tokenize(line, return_str=True, escape=False, aggressive_dash_splits=True)
    return line


def _normalize_job(args):
    return normalize_line(*args)


def normalize_file(src_path, dest_path, lang, tokenize=False, workers=1):
    """Normalise a text file line by line (in ``workers`` processes), atomically.

    Args:
        src_path: input text.
        dest_path: output text.
        lang: language code.
        tokenize: Moses-tokenize as well.
        workers: processes.
    """
    lines = read_lines(src_path)
    jobs = ((line, lang, tokenize) for line in lines)
    out = []
    step = max(len(lines) // 10, 100000)
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(_normalize_job, jobs, chunksize=2000) if pool else map(_normalize_job, jobs)
        for i, line in enumerate(results, 1):
            out.append(line)
            if i % step == 0:
                logger.info("normalize %s: %d/%d lines", os.path.basename(src_path), i, len(lines))
    write_lines(dest_path, out)


def clean_corpus(src_in, tgt_in, src_out, tgt_out, min_len=1, max_len=250, ratio=1.5):
    """Apply ``keep_pair`` to two parallel files (Moses clean-corpus-n).

    Args:
        src_in: source input.
        tgt_in: target input.
        src_out: kept source lines.
        tgt_out: kept target lines.
        min_len: see ``keep_pair``.
        max_len: see ``keep_pair``.
        ratio: see ``keep_pair``.

    Returns:
        ``(kept, total)`` line counts.
    """
    src, tgt = read_lines(src_in), read_lines(tgt_in)
    if len(src) != len(tgt):
        raise ValueError(f"{src_in} has {len(src)} lines but {tgt_in} has {len(tgt)}")
    kept = [(s, t) for s, t in zip(src, tgt) if keep_pair(s, t, min_len, max_len, ratio)]
    write_lines(src_out, (s for s, _ in kept))
    write_lines(tgt_out, (t for _, t in kept))
    logger.info("clean: kept %d of %d pairs", len(kept), len(src))
    return len(kept), len(src)


def train_sentencepiece(inputs, model_prefix, vocab_size, model_type="bpe",
                        character_coverage=1.0, input_sentence_size=10000000, seed=1, threads=1):
    """Train one joint sentencepiece model on the given files.

    Writes ``model_prefix.model`` and ``.vocab`` atomically.

    Args:
        inputs: text files, one sentence per line.
        model_prefix: output path without extension.
        vocab_size: pieces in the model.
        model_type: ``bpe`` or ``unigram`` (also ``char``, ``word``).
        character_coverage: fraction of characters covered (1.0 for German/English).
        input_sentence_size: sentences sampled for training (0 = all).
        seed: sampling seed.
        threads: trainer threads.
    """
    import sentencepiece as spm

    # The model records its prefix: a fixed temporary path keeps the output
    # byte-identical from run to run (a killed run's leftovers are overwritten).
    tmp_dir = os.path.join(os.path.dirname(os.path.abspath(model_prefix)), ".spm_tmp")
    os.makedirs(tmp_dir, exist_ok=True)
    tmp_prefix = os.path.join(tmp_dir, os.path.basename(model_prefix))
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=",".join(inputs),
        model_prefix=tmp_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=1,
    )
    for ext in (".vocab", ".model"):
        os.replace(tmp_prefix + ext, model_prefix + ext)
    os.rmdir(tmp_dir)


def encode_file(model, src_path, dest_path, batch=20000):
    """Encode a text file into space-separated sentencepiece pieces, atomically.

    Args:
        model: sentencepiece model path.
        src_path: input text.
        dest_path: output pieces.
        batch: lines per encode call.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    lines = read_lines(src_path)
    with atomic_path(dest_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(0, len(lines), batch):
                for pieces in sp.encode(lines[i:i + batch], out_type=str):
                    f.write(" ".join(pieces) + "\n")
                if len(lines) > batch:
                    logger.info("encode %s: %d/%d lines", os.path.basename(src_path),
                                min(i + batch, len(lines)), len(lines))


def binarize(prefixes, destdir, src, tgt, workers=1, extra_files=()):
    """Run ``fairseq-preprocess --joined-dictionary`` into ``destdir``, atomically.

    Args:
        prefixes: ``{"train": path prefix, "valid": ..., "test": ...}`` where
            ``prefix.{src,tgt}`` exist.
        destdir: output directory.
        src: source language.
        tgt: target language.
        workers: fairseq-preprocess workers.
        extra_files: files copied into the output (the sentencepiece model).
    """
    with atomic_path(destdir) as tmp:
        cmd = [
            sys.executable, "-m", "fairseq_cli.preprocess",
            "--source-lang", src, "--target-lang", tgt,
            "--trainpref", prefixes["train"], "--validpref", prefixes["valid"],
            "--testpref", prefixes["test"], "--destdir", tmp,
            "--joined-dictionary", "--workers", str(workers),
        ]
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        for path in extra_files:
            shutil.copy(path, os.path.join(tmp, os.path.basename(path)))


def build_from_raw(pipe, raw_dir, work, cfg):
    """The shared tail of the pipeline: clean, sentencepiece, encode, binarize.

    Args:
        pipe: a ``Pipeline``.
        raw_dir: directory with ``{train,valid,test}.{src,tgt}`` raw text.
        work: output root (``clean/``, ``spm/``, ``encoded/``, ``databin/``).
        cfg: an ``argparse.Namespace`` with src, tgt, tokenize, min_len,
            max_len, ratio, vocab_size, spm_model_type, character_coverage,
            input_sentence_size, workers.
    """
    src, tgt = cfg.src, cfg.tgt
    splits = ("train", "valid", "test")
    norm_dir, clean_dir = os.path.join(work, "normalized"), os.path.join(work, "clean")
    spm_dir, enc_dir = os.path.join(work, "spm"), os.path.join(work, "encoded")
    for d in (norm_dir, clean_dir, spm_dir, enc_dir):
        os.makedirs(d, exist_ok=True)
    raw = {(s, l): os.path.join(raw_dir, f"{s}.{l}") for s in splits for l in (src, tgt)}
    norm = {k: os.path.join(norm_dir, f"{k[0]}.{k[1]}") for k in raw}
    clean = {k: os.path.join(clean_dir, f"{k[0]}.{k[1]}") for k in raw}

    def do_normalize():
        for (split, lang), path in raw.items():
            normalize_file(path, norm[split, lang], lang, cfg.tokenize, cfg.workers)

    pipe.run("normalize", {"tokenize": cfg.tokenize, "sizes": file_sizes(raw.values())},
             list(norm.values()), do_normalize)

    def do_clean():
        clean_corpus(norm["train", src], norm["train", tgt], clean["train", src], clean["train", tgt],
                     cfg.min_len, cfg.max_len, cfg.ratio)
        # Valid and test are never filtered: scores must cover the whole set.
        for split in ("valid", "test"):
            for lang in (src, tgt):
                shutil.copy(norm[split, lang], clean[split, lang] + ".tmp")
                os.replace(clean[split, lang] + ".tmp", clean[split, lang])

    pipe.run("clean", {"min": cfg.min_len, "max": cfg.max_len, "ratio": cfg.ratio},
             list(clean.values()), do_clean)

    model = os.path.join(spm_dir, "spm.model")
    spm_params = {
        "vocab": cfg.vocab_size, "type": cfg.spm_model_type,
        "coverage": cfg.character_coverage, "sentences": cfg.input_sentence_size,
    }
    pipe.run("spm_train", spm_params, [model], lambda: train_sentencepiece(
        [clean["train", src], clean["train", tgt]], model[:-len(".model")], cfg.vocab_size,
        cfg.spm_model_type, cfg.character_coverage, cfg.input_sentence_size, threads=cfg.workers))

    enc = {k: os.path.join(enc_dir, f"{k[0]}.{k[1]}") for k in raw}

    def do_encode():
        for key, path in clean.items():
            encode_file(model, path, enc[key])

    pipe.run("encode", {}, list(enc.values()), do_encode)

    databin = os.path.join(work, "databin")
    pipe.run("binarize", {"src": src, "tgt": tgt}, [databin], lambda: binarize(
        {s: os.path.join(enc_dir, s) for s in splits}, databin, src, tgt, cfg.workers, [model]))
    logger.info("binarized data in %s", databin)
    return databin


def file_sizes(paths):
    """``{base name: size}`` of files: cheap change detection for a step's inputs.

    Args:
        paths: file paths.
    """
    return {os.path.basename(p): os.path.getsize(p) for p in paths}


def add_common_args(parser, vocab_size):
    """Options shared by the WMT and demo entry points.

    Args:
        parser: an ``argparse.ArgumentParser``.
        vocab_size: default sentencepiece vocabulary size.
    """
    parser.add_argument("--src", default="en", help="source language (en or de)")
    parser.add_argument("--tgt", default="de", help="target language (de or en)")
    parser.add_argument("--vocab-size", type=int, default=vocab_size, help="joint sentencepiece vocabulary")
    parser.add_argument("--spm-model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--input-sentence-size", type=int, default=10000000,
                        help="sentences sampled to train sentencepiece (0 = all)")
    parser.add_argument("--tokenize", type=int, default=0, choices=[0, 1],
                        help="Moses-tokenize before sentencepiece (default 0: raw text)")
    parser.add_argument("--min-len", type=int, default=1, help="clean: fewest tokens per side")
    parser.add_argument("--max-len", type=int, default=250, help="clean: most tokens per side")
    parser.add_argument("--ratio", type=float, default=1.5, help="clean: largest length ratio")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--stop-after", default=None, help="stop after this step (e.g. fetch, clean)")


def setup_logging():
    """Log lines like fairseq's, to stderr."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
    )
