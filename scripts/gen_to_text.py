# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Score a ``fairseq-generate`` output with sacreBLEU, detokenized.

The command line behind ``scripts/sacrebleu.sh``; the work is done by
``mt_prep.bleu``: read the generate log, keep the hypotheses (``D-<id>``
lines, or ``H-<id>`` lines when the run printed no ``D-`` line), put them
back in the original test order (by id), join sentencepiece pieces unless the
run already did (``--bpe sentencepiece``), check the count against the
reference and print sacreBLEU's score line with its signature, as
``sacrebleu -f text`` does.

Usage::

    python scripts/gen_to_text.py GEN_OUTPUT REFERENCE_FILE
    python scripts/gen_to_text.py GEN_OUTPUT wmt14/full en de   # sacrebleu test set
    python scripts/gen_to_text.py GEN_OUTPUT REF --write-hyp hyp.txt
    python scripts/gen_to_text.py wmt14/full en de GEN_OUTPUT   # the reference plugin's order

A REFERENCE that names an existing file is a plain reference (one sentence a
line, original test order); anything else is taken as a sacrebleu test set
name, which needs SRC TGT and sacrebleu's download (or its cache,
``~/.sacrebleu``, or the folder ``$SACREBLEU``). The reference plugin's order
``TEST_SET SRC TGT GEN_OUTPUT`` is accepted too (``mt_prep.bleu.order_arguments``
says how it is told apart). Exit status 2 on a usage or count error, with one
message.
"""

import argparse
import os
import sys
from typing import List, Optional

from mt_prep.bleu import (
    ScoringError,
    detokenize,
    load_references,
    order_arguments,
    parse_generate_output,
    score,
)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line; see the module docstring.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status.
    """
    parser = argparse.ArgumentParser(
        description="sacreBLEU of a fairseq-generate output (detokenized)."
    )
    parser.add_argument("gen_output", help="fairseq-generate output (D-/H- lines); - for stdin")
    parser.add_argument("reference", help="plain reference file, or a sacrebleu test set name")
    parser.add_argument("src_lang", nargs="?", help="source language (test set names)")
    parser.add_argument("tgt_lang", nargs="?", help="target language (test set names)")
    parser.add_argument(
        "--detok",
        choices=("auto", "sentencepiece", "none"),
        default="auto",
        help="join sentencepiece pieces: auto = when the text has '\u2581'",
    )
    parser.add_argument(
        "--write-hyp", metavar="PATH", help="also write the detokenized hypotheses here"
    )
    args = parser.parse_args(argv)
    try:
        positional = [args.gen_output, args.reference, args.src_lang, args.tgt_lang]
        args.gen_output, args.reference, args.src_lang, args.tgt_lang = order_arguments(
            [x for x in positional if x is not None]
        )
        if args.gen_output == "-":
            hyps = parse_generate_output(sys.stdin)
        else:
            with open(args.gen_output, encoding="utf-8") as f:
                hyps = parse_generate_output(f)
        hyps = detokenize(hyps, args.detok)
        refs, _ = load_references(args.reference, args.src_lang, args.tgt_lang)
        result, sig = score(hyps, refs, args.tgt_lang)
    except (ScoringError, OSError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    if args.write_hyp:
        with open(args.write_hyp, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
    print(result.format(signature=sig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
