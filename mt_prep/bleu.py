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
    try:
        paths = get_reference_files(reference, langpair)
    except BaseException as e:  # sacrebleu calls sys.exit on unknown pairs and failed downloads
        raise ScoringError(
            f"cannot get references of {reference} {langpair} (offline?): {e}"
        ) from None
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
