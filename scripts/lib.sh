# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# What the bash scripts share; sourced by run.sh, prepare-wmt16ende.sh,
# scripts/demo.sh and scripts/sacrebleu.sh (bash 3.2 or later):
#
#   PYTHON                      set unless the environment sets it: the repository's
#                               .venv/bin/python if present, else python3
#   die MESSAGE                 "<script>: error: MESSAGE" on stderr, exit status 2

_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$_repo/.venv/bin/python" ]]; then PYTHON="$_repo/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "${0##*/}: error: $*" >&2; exit 2; }
