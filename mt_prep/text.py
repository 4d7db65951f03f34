# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Text: WMT SGML, Moses-style normalization and cleaning, held-out splits.

Replaces the Moses perl scripts (``input-from-sgm.perl``,
``remove-non-printing-char.perl``, ``normalize-punctuation.perl``,
``tokenizer.perl``, ``clean-corpus-n.perl``) with Python and sacremoses.
The functions above ``normalize_line`` are pure and unit tested.
"""

import contextlib
import html
import logging
import multiprocessing
import os
import re
import unicodedata

from .files import read_lines, write_lines

logger = logging.getLogger("mt_prep")


SEG_RE = re.compile(r"<seg\b[^>]*>(.*?)</seg>", re.DOTALL | re.IGNORECASE)


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
        if pool:
            results = pool.imap(_normalize_job, jobs, chunksize=2000)
        else:
            results = map(_normalize_job, jobs)
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
