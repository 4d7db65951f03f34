#!/usr/bin/env bash
# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# Detokenized sacreBLEU of a fairseq-generate output.
#
# Usage: bash scripts/sacrebleu.sh GEN_OUTPUT REFERENCE [SRC_LANG TGT_LANG]
#    or: bash scripts/sacrebleu.sh REFERENCE SRC_LANG TGT_LANG GEN_OUTPUT
#
#   GEN_OUTPUT  fairseq-generate output (D-<id> lines, or H-<id> lines if none)
#   REFERENCE   plain reference file (one sentence a line, original test order),
#               or a sacrebleu test set name (e.g. wmt14/full; then SRC_LANG
#               TGT_LANG are required, as sacrebleu's -l SRC-TGT, and sacrebleu
#               downloads it once into its cache, the folder $SACREBLEU
#               [~/.sacrebleu]; offline, give the plain reference file instead)
#
# The second order is the reference plugin's (wmt14/full en de gen.out); it is
# told apart by which argument is an existing file or a test set name.
# Hypotheses are put back in test order and sentencepiece pieces are joined
# unless generate already decoded them (--bpe sentencepiece). Prints one
# sacreBLEU line with its signature; exits 2 when the counts do not match.
# Extra options of scripts/gen_to_text.py (--write-hyp PATH, --detok MODE)
# may follow. Env: PYTHON (default: the repo's .venv/bin/python, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/lib.sh"  # PYTHON
if [[ $# -lt 2 ]]; then
    sed -n '5,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
exec "$PYTHON" "$here/gen_to_text.py" "$@"
