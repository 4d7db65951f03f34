#!/usr/bin/env bash
# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# Prepare WMT16 English-German for fairseq: download, verify, extract, clean,
# train a joint sentencepiece model, encode and binarize with
# `fairseq-preprocess --joined-dictionary`. Resumable: rerun after an
# interruption and finished steps are skipped. The work is done by
# scripts/prepare_wmt16.py; this wrapper maps environment variables to its flags.
#
# Environment (defaults in brackets):
#   WORKSPACE            root of all outputs [<repo>/workspace, as run.sh]; data lands in
#                        $WORKSPACE/wmt16_${SRC}_${TGT}/databin, archives in
#                        $WORKSPACE/wmt16_downloads
#   OUT                  output root instead of $WORKSPACE/wmt16_${SRC}_${TGT}
#   WMT_MIRROR           base URL serving every archive by its file name
#                        (training-parallel-europarl-v7.tgz, ..., test-full.tgz)
#                        instead of the WMT sites [unset]
#   WMT_CHECKSUMS        sha256sum-style file of known archive digests, checked on
#                        every run, also against archives downloaded before [unset]
#   SRC, TGT             direction [en, de]; de/en is supported
#   VALID                newstest2013 or heldout (every 100th training line) [newstest2013]
#   VOCAB_SIZE           joint sentencepiece vocabulary [32000]
#   SPM_MODEL_TYPE       bpe or unigram [bpe]
#   CHARACTER_COVERAGE   sentencepiece character coverage [1.0]
#   INPUT_SENTENCE_SIZE  sentences sampled to train sentencepiece, 0 = all [10000000]
#   TOKENIZE             1 = Moses-tokenize (sacremoses) before sentencepiece [0]
#   MIN_LEN, MAX_LEN     clean: tokens per side [1, 250]
#   RATIO                clean: largest length ratio between sides [1.5]
#   WORKERS              processes for normalization and fairseq-preprocess [min(nproc, 8)]
#   DOWNLOAD_ATTEMPTS    connection attempts per archive [5]
#   DOWNLOAD_TIMEOUT     socket timeout in seconds [60]
#   RETRY_WAIT           seconds before the first download retry, doubling [2]
#   STOP_AFTER           stop after this step: fetch, extract, raw, normalize,
#                        clean, spm_train, encode [unset: run all]
#   PYTHON               interpreter [the repo's .venv/bin/python if present, else python3]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/scripts/lib.sh"  # PYTHON, WORKSPACE_DEFAULT
NPROC="$(nproc 2>/dev/null || echo 1)"

args=(
    --workspace "${WORKSPACE:-$WORKSPACE_DEFAULT}"
    --src "${SRC:-en}" --tgt "${TGT:-de}"
    --valid "${VALID:-newstest2013}"
    --vocab-size "${VOCAB_SIZE:-32000}"
    --spm-model-type "${SPM_MODEL_TYPE:-bpe}"
    --character-coverage "${CHARACTER_COVERAGE:-1.0}"
    --input-sentence-size "${INPUT_SENTENCE_SIZE:-10000000}"
    --tokenize "${TOKENIZE:-0}"
    --min-len "${MIN_LEN:-1}" --max-len "${MAX_LEN:-250}" --ratio "${RATIO:-1.5}"
    --workers "${WORKERS:-$(( NPROC < 8 ? NPROC : 8 ))}"
    --download-attempts "${DOWNLOAD_ATTEMPTS:-5}"
    --download-timeout "${DOWNLOAD_TIMEOUT:-60}"
    --retry-wait "${RETRY_WAIT:-2}"
)
[[ -n "${OUT:-}" ]] && args+=(--out "$OUT")
[[ -n "${WMT_MIRROR:-}" ]] && args+=(--mirror "$WMT_MIRROR")
[[ -n "${WMT_CHECKSUMS:-}" ]] && args+=(--checksums "$WMT_CHECKSUMS")
[[ -n "${STOP_AFTER:-}" ]] && args+=(--stop-after "$STOP_AFTER")

exec "$PYTHON" "$HERE/scripts/prepare_wmt16.py" "${args[@]}" "$@"
