# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""BLEU: score a ``fairseq-generate`` output with sacreBLEU, and the copy-the-source baseline.

The functions behind ``scripts/sacrebleu.sh`` (``scripts/gen_to_text.py`` is
its command line): read the generate log, keep the hypotheses (``D-<id>``
lines, or ``H-<id>`` lines when the run printed no ``D-`` line), put them
back in the original test order (by id), join sentencepiece pieces unless
the run already did (``--bpe sentencepiece``), check the count against the
reference and score with sacreBLEU, signature included.
"""

import os
import re
import socket
from typing import Iterable, List, Optional, Tuple

SPM_SPACE = "\u2581"  # sentencepiece's word-boundary mark "▁"

# fairseq-generate prints "D-<id>\t<score>\t<text>"; <text> may be empty
_HYP_LINE = re.compile(r"^([DH])-(\d+)\t([^\t]*)(?:\t(.*))?$")


class ScoringError(Exception):
    """A generate output or reference that cannot be scored; the message says why."""


def parse_generate_output(lines: Iterable[str]) -> List[str]:
    """Hypotheses of a ``fairseq-generate`` output, in original (id) order.

    ``D-`` lines (detokenized hypotheses) are used when there are any, else
    ``H-`` lines. With ``--nbest`` > 1 only the first (best) hypothesis of an
    id is kept. Other lines (``S-``, ``T-``, ``P-``, logs) are ignored.

    Args:
        lines: lines of the generate output (with or without line ends).

    Returns:
        the hypothesis texts sorted by sample id.

    Raises:
        ScoringError: no hypothesis, or ids that are not ``0..N-1``.
    """
    found = {"D": {}, "H": {}}
    for line in lines:
        m = _HYP_LINE.match(line.rstrip("\r\n"))
        if m is None:
            continue
        kind, idx, _score, text = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        found[kind].setdefault(idx, (text or "").strip())
    kind = "D" if found["D"] else "H"
    by_id = found[kind]
    if not by_id:
        raise ScoringError(
            "no D-<id> or H-<id> hypothesis lines: is this a fairseq-generate output?"
        )
    missing = sorted(set(range(len(by_id))) - set(by_id))
    if missing:
        raise ScoringError(
            f"{kind}- lines have {len(by_id)} ids but not 0..{len(by_id) - 1} "
            f"(first missing id: {missing[0]}): was generation cut short or run on a subset?"
        )
    return [by_id[i] for i in range(len(by_id))]


def has_pieces(hyps: Iterable[str]) -> bool:
    """Whether any hypothesis still contains sentencepiece's ``▁`` (not yet decoded).

    Args:
        hyps: hypothesis strings.
    """
    return any(SPM_SPACE in h for h in hyps)


def join_pieces(text: str) -> str:
    """Undo sentencepiece segmentation: drop spaces, ``▁`` -> space, strip.

    Args:
        text: space-separated pieces, e.g. ``"▁Hal lo ▁Welt ."``.

    Returns:
        the plain text, e.g. ``"Hallo Welt."``.
    """
    return text.replace(" ", "").replace(SPM_SPACE, " ").strip()


def detokenize(hyps: List[str], mode: str = "auto") -> List[str]:
    """Detokenize hypotheses.

    Args:
        hyps: hypothesis strings.
        mode: ``"sentencepiece"`` (join pieces), ``"none"`` (leave as is) or
            ``"auto"``: join pieces when any hypothesis has a ``▁``, i.e. the
            generate run did not use ``--bpe sentencepiece`` itself.
    """
    if mode == "auto":
        mode = "sentencepiece" if has_pieces(hyps) else "none"
    if mode == "sentencepiece":
        return [join_pieces(h) for h in hyps]
    if mode == "none":
        return list(hyps)
    raise ValueError(f"unknown detokenization mode {mode!r}")


# a language code as sacrebleu's pairs write them (de, sah), or a regional one (pt_BR)
_LANG = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]+)?$")


def is_test_set(name: str) -> bool:
    """Whether ``name`` is a sacrebleu test set name (``wmt14/full``) and no file."""
    from sacrebleu.dataset import DATASETS

    return name in DATASETS and not os.path.isfile(name)


def order_arguments(args: List[str]) -> List[str]:
    """``[GEN_OUTPUT, REFERENCE, SRC, TGT]`` from either argument order.

    Ours is ``GEN_OUTPUT REFERENCE [SRC TGT]``; the reference plugin's (and
    fairseq's ``scripts/sacrebleu.sh``) is ``TEST_SET SRC TGT GEN_OUTPUT``. With
    four arguments the order is the one where the generate output is an existing
    file (or ``-``), the reference a file or a test set name and the languages
    look like language codes. When neither fits, a test set name first or an
    existing file last means the reference plugin's order (so that the error
    names the right argument), anything else ours.

    Args:
        args: the positional arguments, 2 to 4.

    Returns:
        the arguments in our order, missing languages as None.

    Raises:
        ScoringError: both orders fit (files named like language codes).
    """
    args = list(args) + [None] * (4 - len(args))
    if args[3] is None:
        return args
    a, b, c, d = args

    def gen(x):  # a file, a pipe (<(...)) or stdin
        return x == "-" or (os.path.exists(x) and not os.path.isdir(x))

    def ref(x):
        return os.path.isfile(x) or is_test_set(x)

    def lang(x):
        return _LANG.match(x) is not None

    ours = gen(a) and ref(b) and lang(c) and lang(d)
    theirs = ref(a) and lang(b) and lang(c) and gen(d)
    if ours and theirs:
        raise ScoringError(
            f"cannot tell the argument order of '{a} {b} {c} {d}': files named like language "
            f"codes fit both GEN_OUTPUT REFERENCE SRC TGT and TEST_SET SRC TGT GEN_OUTPUT; "
            f"write the file with its folder: './{b}' if {b!r} is your reference (GEN_OUTPUT "
            f"REFERENCE SRC TGT), './{d}' if {d!r} is your generate output (TEST_SET SRC TGT "
            f"GEN_OUTPUT)"
        )
    if theirs or (not ours and (is_test_set(a) or gen(d))):
        return [d, a, b, c]
    return args


def load_references(
    reference: str, src: Optional[str] = None, tgt: Optional[str] = None
) -> Tuple[List[str], str]:
    """Reference sentences from a plain file or a sacrebleu test set.

    Args:
        reference: path of a plain text file, or a sacrebleu test set name.
        src: source language (test sets only).
        tgt: target language (test sets only).

    Returns:
        ``(lines, description)``.

    Raises:
        ScoringError: unknown test set, missing languages or failed download.
    """
    if os.path.isfile(reference):
        with open(reference, encoding="utf-8") as f:
            return [line.rstrip("\n").rstrip("\r") for line in f], reference
    from sacrebleu.dataset import DATASETS
    from sacrebleu.utils import get_reference_files

    if reference not in DATASETS:
        raise ScoringError(
            f"reference {reference!r} is neither a file nor a sacrebleu test set name"
        )
    if not (src and tgt):
        raise ScoringError(
            f"test set {reference!r} needs SRC_LANG TGT_LANG (as sacrebleu's -l src-tgt)"
        )
    langpair = f"{src}-{tgt}"
    # sacrebleu >= 2.2: a dataset object with langpairs; before: a dict, pairs among its keys
    info = DATASETS[reference]
    pairs = [p for p in getattr(info, "langpairs", info) if p != "meta" and "-" in p]
    if langpair not in pairs:
        raise ScoringError(
            f"test set {reference!r} has no {langpair} pair (it has: {', '.join(sorted(pairs))})"
        )
    from sacrebleu.utils import SACREBLEU_DIR

    # sacrebleu downloads once, with no retry and no timeout: bound a stalled connection
    timeout = socket.getdefaulttimeout()
    if timeout is None:  # (a timeout the caller set stays)
        socket.setdefaulttimeout(60)
    try:
        paths = get_reference_files(reference, langpair)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # sacrebleu calls sys.exit on failed downloads
        reason = "sacrebleu exited" if isinstance(e, SystemExit) else e
        raise ScoringError(
            f"could not download the test set {reference} ({langpair}) into sacrebleu's cache "
            f"(SACREBLEU={SACREBLEU_DIR}: {reason}): give the plain-text reference file "
            f"instead of {reference!r}, or set SACREBLEU to a copy of a sacrebleu cache that "
            f"holds it (~/.sacrebleu of a machine online)"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)
    if len(paths) != 1:
        raise ScoringError(
            f"{reference} {langpair} has {len(paths)} references; this script scores one"
        )
    with open(paths[0], encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f], f"{reference} ({langpair})"


def score(hyps: List[str], refs: List[str], tgt: Optional[str] = None):
    """sacreBLEU of ``hyps`` against one reference per line.

    Args:
        hyps: detokenized hypotheses.
        refs: references, same length and order.
        tgt: target language, lets sacrebleu pick its tokenizer (zh, ja, ko) as its CLI does.

    Returns:
        ``(BLEUScore, signature string)``.

    Raises:
        ScoringError: the counts differ.
    """
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise ScoringError(
            f"{len(hyps)} hypotheses but {len(refs)} reference lines: the generate output "
            f"must cover the whole test split (same order as the reference)"
        )
    bleu = BLEU(trg_lang=tgt or "")
    result = bleu.corpus_score(hyps, [refs])
    return result, bleu.get_signature().format()


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
