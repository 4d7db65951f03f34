# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The pipeline both data scripts share from the raw text on, and their common options.

``build_from_raw``: normalize, clean, train sentencepiece, encode, and
binarize with ``fairseq-preprocess --joined-dictionary``, each a resumable
step (``steps.Pipeline``). ``prepare_wmt16.py`` and ``prepare_demo.py``
write the raw text their own way, then call it.
"""

import logging
import os
import shutil
import subprocess
import sys

from .files import atomic_path, file_sizes
from .subword import encode_file, train_sentencepiece
from .text import clean_corpus, normalize_file

logger = logging.getLogger("mt_prep")


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
        # fmt: off
        cmd = [
            sys.executable, "-m", "fairseq_cli.preprocess",
            "--source-lang", src, "--target-lang", tgt,
            "--trainpref", prefixes["train"], "--validpref", prefixes["valid"],
            "--testpref", prefixes["test"], "--destdir", tmp,
            "--joined-dictionary", "--workers", str(workers),
        ]
        # fmt: on
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

    pipe.run(
        "normalize",
        {"tokenize": cfg.tokenize, "sizes": file_sizes(raw.values())},
        list(norm.values()),
        do_normalize,
    )

    def do_clean():
        clean_corpus(
            norm["train", src],
            norm["train", tgt],
            clean["train", src],
            clean["train", tgt],
            cfg.min_len,
            cfg.max_len,
            cfg.ratio,
        )
        # Valid and test are never filtered: scores must cover the whole set.
        for split in ("valid", "test"):
            for lang in (src, tgt):
                shutil.copy(norm[split, lang], clean[split, lang] + ".tmp")
                os.replace(clean[split, lang] + ".tmp", clean[split, lang])

    pipe.run(
        "clean",
        {"min": cfg.min_len, "max": cfg.max_len, "ratio": cfg.ratio},
        list(clean.values()),
        do_clean,
    )

    model = os.path.join(spm_dir, "spm.model")
    spm_params = {
        "vocab": cfg.vocab_size,
        "type": cfg.spm_model_type,
        "coverage": cfg.character_coverage,
        "sentences": cfg.input_sentence_size,
    }
    pipe.run(
        "spm_train",
        spm_params,
        [model],
        lambda: train_sentencepiece(
            [clean["train", src], clean["train", tgt]],
            model[: -len(".model")],
            cfg.vocab_size,
            cfg.spm_model_type,
            cfg.character_coverage,
            cfg.input_sentence_size,
            threads=cfg.workers,
        ),
    )

    enc = {k: os.path.join(enc_dir, f"{k[0]}.{k[1]}") for k in raw}

    def do_encode():
        for key, path in clean.items():
            encode_file(model, path, enc[key])

    pipe.run("encode", {}, list(enc.values()), do_encode)

    databin = os.path.join(work, "databin")
    pipe.run(
        "binarize",
        {"src": src, "tgt": tgt},
        [databin],
        lambda: binarize(
            {s: os.path.join(enc_dir, s) for s in splits}, databin, src, tgt, cfg.workers, [model]
        ),
    )
    logger.info("binarized data in %s", databin)
    return databin


def add_common_args(parser, vocab_size):
    """Options shared by the WMT and demo entry points.

    Args:
        parser: an ``argparse.ArgumentParser``.
        vocab_size: default sentencepiece vocabulary size.
    """
    parser.add_argument("--src", default="en", help="source language (en or de)")
    parser.add_argument("--tgt", default="de", help="target language (de or en)")
    parser.add_argument(
        "--vocab-size", type=int, default=vocab_size, help="joint sentencepiece vocabulary"
    )
    parser.add_argument(
        "--spm-model-type", default="bpe", choices=["bpe", "unigram", "char", "word"]
    )
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=10000000,
        help="sentences sampled to train sentencepiece (0 = all)",
    )
    parser.add_argument(
        "--tokenize",
        type=int,
        default=0,
        choices=[0, 1],
        help="Moses-tokenize before sentencepiece (default 0: raw text)",
    )
    parser.add_argument("--min-len", type=int, default=1, help="clean: fewest tokens per side")
    parser.add_argument("--max-len", type=int, default=250, help="clean: most tokens per side")
    parser.add_argument("--ratio", type=float, default=1.5, help="clean: largest length ratio")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument(
        "--stop-after", default=None, help="stop after this step (e.g. fetch, clean)"
    )


def setup_logging():
    """Log lines like fairseq's, to stderr."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
    )
