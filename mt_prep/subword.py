# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Sentencepiece: train one joint model, encode text into pieces."""

import logging
import os

from .files import atomic_path, read_lines

logger = logging.getLogger("mt_prep")


def train_sentencepiece(
    inputs,
    model_prefix,
    vocab_size,
    model_type="bpe",
    character_coverage=1.0,
    input_sentence_size=10000000,
    seed=1,
    threads=1,
):
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
                for pieces in sp.encode(lines[i : i + batch], out_type=str):
                    f.write(" ".join(pieces) + "\n")
                if len(lines) > batch:
                    logger.info(
                        "encode %s: %d/%d lines",
                        os.path.basename(src_path),
                        min(i + batch, len(lines)),
                        len(lines),
                    )
