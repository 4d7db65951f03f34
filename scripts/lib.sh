# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# What the bash scripts share; sourced by run.sh, prepare-wmt16ende.sh,
# scripts/demo.sh and scripts/sacrebleu.sh (bash 3.2 or later):
#
#   PYTHON                      set unless the environment sets it: the repository's
#                               .venv/bin/python if present, else python3
#   WORKSPACE_DEFAULT           the data root when WORKSPACE is unset: <repo>/workspace
#                               (prepare-wmt16ende.sh writes there, run.sh reads there)
#   die MESSAGE                 "<script>: error: MESSAGE" on stderr, exit status 2
#   run_tool MODULE ARGS        python -m MODULE ARGS from the repository's root, so that
#                               a script uses its own checkout's mt_run (its recipes),
#                               whichever checkout PYTHON has installed, if any; file
#                               arguments must be absolute (or given on stdin)
#   run_here MODULE ARGS        python -m MODULE ARGS in the caller's folder, with the
#                               repository's root first on PYTHONPATH (its own mt_run
#                               too): for the stages of a run (mt_run.console, whose
#                               command resolves relative paths as the user gave them)
#   read_values PREFIX MODULE ARGS
#                               run_tool a tool that prints name=value lines (mt_run.recipes,
#                               mt_run.fairseq_log summary); set PREFIX_name to each value
#   read_lines ARRAY MODULE ARGS
#                               run_tool a tool and set the array ARRAY to its lines (the
#                               flags of mt_run.recipes ... --flags)
#
# The readers die, naming the tool, when it fails (but for exit status 2, the tool's
# own error line: a bad argument).

_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$_repo/.venv/bin/python" ]]; then PYTHON="$_repo/.venv/bin/python"; else PYTHON=python3; fi
elif [[ $PYTHON == */* && $PYTHON != /* ]]; then
    PYTHON="$PWD/$PYTHON"  # still found from the repository's root
fi

WORKSPACE_DEFAULT="$_repo/workspace"

die() { echo "${0##*/}: error: $*" >&2; exit 2; }

run_tool() { (cd "$_repo" && "$PYTHON" -m "$@"); }

run_here() { PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m "$@"; }

# (exit status 2: the tool said why, in a line naming what to change)
_tool_output() { run_tool "$@" || { local s=$?; ((s == 2)) && exit 2; die "'$PYTHON -m $*' failed"; }; }

read_values() {
    local prefix="$1" out line
    shift
    out="$(_tool_output "$@")" || exit 2
    while IFS= read -r line; do
        [[ $line =~ ^[a-z_][a-z0-9_]*= ]] || die "'$PYTHON -m $*' printed '$line', not name=value"
        printf -v "${prefix}_${line%%=*}" '%s' "${line#*=}"
    done <<< "$out"
}

read_lines() {
    local array="$1" out line
    shift
    out="$(_tool_output "$@")" || exit 2
    eval "$array=()"
    [[ -n $out ]] || return 0
    while IFS= read -r line; do
        eval "$array+=(\"\$line\")"
    done <<< "$out"
}
