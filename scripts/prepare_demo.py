# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Prepare the bundled LibreOffice English-German demo corpus for fairseq.

Runs the same pipeline as the WMT16 preparation from the normalize/clean step
on (sentencepiece, encode, ``fairseq-preprocess --joined-dictionary``), with
a small vocabulary suited to a small CPU model. Idempotent like the WMT script.

Usage::

    python scripts/prepare_demo.py --workspace /tmp/ws          # en -> de
    python scripts/prepare_demo.py --out /tmp/demo --src de --tgt en
    python scripts/prepare_demo.py --copy-baseline              # print BLEU only

Layout under ``--out`` (default ``WORKSPACE/demo_SRC_TGT``): ``raw/`` plain
text (``raw/test.{src,tgt}`` are the detokenized test sides for sacrebleu),
``spm/spm.model``, ``encoded/``, ``databin/`` (with a copy of ``spm.model``).
"""

import argparse
import os
import sys

import mt_prep

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
SPLITS = ("train", "valid", "test")


def demo_lines(split, lang, corpus_dir=DEMO_DIR):
    """Lines of one side of a bundled demo split.

    Args:
        split: ``train``, ``valid`` or ``test``.
        lang: ``en`` or ``de``.
        corpus_dir: folder with ``{split}.{lang}.gz``.
    """
    return mt_prep.read_lines(os.path.join(corpus_dir, f"{split}.{lang}.gz"))


def copy_baseline_bleu(src="en", tgt="de", split="test", corpus_dir=DEMO_DIR):
    """sacrebleu of the untranslated source against the reference of a demo split.

    Args:
        src: language used as hypothesis.
        tgt: reference language.
        split: demo split.
        corpus_dir: folder of the corpus.

    Returns:
        sacrebleu's ``BLEUScore``.
    """
    return mt_prep.copy_source_bleu(
        demo_lines(split, src, corpus_dir), demo_lines(split, tgt, corpus_dir)
    )


def write_raw(raw_dir, src, tgt, max_lines=None, corpus_dir=DEMO_DIR):
    """Decompress the demo corpus into ``raw_dir/{split}.{lang}``.

    Args:
        raw_dir: output folder.
        src: source language.
        tgt: target language.
        max_lines: keep only the first N lines of each split (for quick tests).
        corpus_dir: folder of the corpus.
    """
    for split in SPLITS:
        for lang in (src, tgt):
            lines = demo_lines(split, lang, corpus_dir)
            mt_prep.write_lines(os.path.join(raw_dir, f"{split}.{lang}"), lines[:max_lines])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Prepare the bundled en-de demo corpus for fairseq."
    )
    parser.add_argument("--workspace", default=os.environ.get("WORKSPACE", "."))
    parser.add_argument("--out", help="output root (default WORKSPACE/demo_SRC_TGT)")
    parser.add_argument(
        "--corpus-dir", default=DEMO_DIR, help="folder with {train,valid,test}.{en,de}.gz"
    )
    parser.add_argument(
        "--max-lines", type=int, default=None, help="first N lines of each split only"
    )
    parser.add_argument(
        "--copy-baseline",
        action="store_true",
        help="print the copy-the-source BLEU of the test split and exit",
    )
    mt_prep.add_common_args(parser, vocab_size=8000)
    # Moses' 1.5 drops a tenth of this corpus, mostly one-word UI labels whose
    # German has two words ("Placement" / "Platzierung:"); 2.0 keeps them.
    parser.set_defaults(ratio=2.0)
    args = parser.parse_args(argv)
    mt_prep.setup_logging()
    if {args.src, args.tgt} != {"en", "de"}:
        parser.error("--src/--tgt must be en/de or de/en")

    if args.copy_baseline:
        bleu = copy_baseline_bleu(args.src, args.tgt, "test", args.corpus_dir)
        print(f"copy-source baseline on demo test ({args.src} as {args.tgt}): {bleu}")
        return 0

    out = args.out or os.path.join(args.workspace, f"demo_{args.src}_{args.tgt}")
    raw_dir = os.path.join(out, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    pipe = mt_prep.Pipeline(out, stop_after=args.stop_after)
    raw_outputs = [os.path.join(raw_dir, f"{s}.{l}") for s in SPLITS for l in (args.src, args.tgt)]
    try:
        pipe.run(
            "raw",
            {
                "max_lines": args.max_lines,
                "corpus": mt_prep.file_sizes(
                    os.path.join(args.corpus_dir, f"{s}.{l}.gz")
                    for s in SPLITS
                    for l in ("en", "de")
                ),
            },
            raw_outputs,
            lambda: write_raw(raw_dir, args.src, args.tgt, args.max_lines, args.corpus_dir),
        )
        mt_prep.build_from_raw(pipe, raw_dir, out, args)
    except mt_prep.StopPipeline as stop:
        mt_prep.logger.info("stopped after step %s as asked", stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
