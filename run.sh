#!/usr/bin/env bash
# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# Train, translate and benchmark DeepSpeed MoE Transformers (and their dense
# baseline) with fairseq, configured by environment variables.
#
# Usage: bash run.sh [train|generate|test|bench|help] [fairseq options...]
#        bash run.sh translate ["sentence" ...] [fairseq options...]
#
#   train     (default) train, resuming from the run's checkpoint_last.pt
#   generate  translate the test split with the run's checkpoint_best.pt (else
#             checkpoint_last.pt) and score it with scripts/sacrebleu.sh; one
#             process, on one node (NUM_GPUS and NNODES select the run's name only)
#   test      the same as generate (the reference plugin's name for it)
#   translate translate the sentences given (else stdin, one a line) with the
#             checkpoint generate uses; prints one translation a line (the
#             sentences come first: the first word starting with - starts the
#             fairseq options, so give such a sentence on stdin)
#   bench     train dense and MoE for BENCH_UPDATES updates with the same
#             settings (nothing saved) and print their train tokens/s side by side
#
# Options after the mode go to fairseq last, so they override run.sh's choices
# (e.g. `bash run.sh train --max-update 50 --lr 0.001`).
#
# On screen: a line per stage, a progress bar (plain lines when the output is not a
# terminal) and a summary; fairseq's full output goes to the run folder: train.log
# (NNODES > 1: train.node$NODE_RANK.log if NODE_RANK is set, else train.<host>.log),
# generate.log, translate.log, with the pictures valid.png and experts.png. VERBOSE=1
# shows fairseq's output instead.
#
# Environment (defaults in brackets; "tiny" is the ARCH=transformer_ds_moe_tiny
# recipe, "WMT" every other ARCH, both in mt_run/recipes.py; see README.md, section run.sh):
#   RECIPE         tiny, wmt or reference [tiny for ARCH=transformer_ds_moe_tiny or,
#                  without ARCH, on CPU; else wmt]; reference: the reference plugin's
#                  example command flag for flag (de->en, transformer_ds_moe_tiny, BLEU
#                  during training every 20 updates, a checkpoint every 100) but for
#                  the corrections it prints at start
#   WORKSPACE      data root [<repo>/workspace]
#   DATABIN        fairseq-preprocess output [$WORKSPACE/wmt16_${SRC}_${TGT}/databin
#                  when prepare-wmt16ende.sh has written it, else the bundled demo
#                  corpus, prepared by scripts/prepare_demo.py in
#                  $WORKSPACE/demo_${SRC}_${TGT}/databin]; named at start
#   SRC, TGT       translation direction [en, de; de, en with RECIPE=reference]
#   OUT_DIR        artifacts [$WORKSPACE/train_artifacts]: checkpoints in
#                  $OUT_DIR/checkpoints/$ARCH-$RUN_NAME, tensorboard logs in
#                  $OUT_DIR/tb/$ARCH-$RUN_NAME
#   RUN_NAME       [moe_g<processes>_ep<EP>_ex<experts>_k<top-k>_<mode>, or
#                  baseline with DENSE=1]
#   DEVICE         auto, cpu or cuda [auto: cuda when torch sees a GPU]
#   ARCH           [transformer_ds_moe_wmt_en_de on GPUs, transformer_ds_moe_tiny on CPU
#                  and with RECIPE=reference]
#   DENSE          1 = the same architecture without --deepspeed_moe [0]; with the
#                  tiny recipe its FFN is TOP_K experts wide (the MoE's compute per token)
#   NUM_EXPERTS    experts per MoE layer [8 WMT, 4 tiny]
#   MOE_MODE       --deepspeed_moe: enc, dec or enc,dec [enc,dec]
#   MOE_FREQ       every MOE_FREQ-th layer is MoE [2 WMT, 1 tiny]
#   TOP_K          experts per token [1 WMT, 2 tiny (experts 128 wide, dropless)]
#   EP_WORLD_SIZE  --ep-world-size [the largest size that divides NUM_GPUS and
#                  NUM_EXPERTS (their gcd): NUM_GPUS when it divides NUM_EXPERTS,
#                  e.g. 4 for 8 GPUs and 4 experts; a line says so when it is not
#                  NUM_GPUS. Expert groups stay within a node, the rest is data
#                  parallel. It is part of RUN_NAME]
#   MAX_TOKENS     tokens per batch and process, --max-tokens and --max-tokens-valid
#                  [8192 WMT on GPUs (the reference's), 4096 tiny; on CPU 1024 tiny,
#                  else 2048]
#   UPDATE_FREQ    batches per update [16 WMT (the reference's: about 1M tokens an
#                  update on 8 GPUs), 1 tiny]
#   MAX_UPDATE     updates [300000 WMT, 2000 tiny]
#   SEED           [43821]
#   FP16           1 = --fp16 (plus --memory-efficient-fp16 for MoE when EP_WORLD_SIZE > 1)
#                  [1 on GPUs, 0 on CPU]
#   NUM_GPUS       processes per node [GPUs seen by torch; 1 on CPU]; more than
#                  one process (per node or in all) starts torchrun, CPU
#                  processes (gloo) when there is no GPU
#   NNODES         nodes [1]; more than one: run the same command on every node,
#                  OUT_DIR on a filesystem they all share; torchrun's c10d
#                  rendezvous at MASTER_ADDR:MASTER_PORT, which the agents reach
#                  in any order
#   MASTER_ADDR    NNODES > 1: the address of one node, the same on every node
#                  (its agent hosts the rendezvous) [required]
#   MASTER_PORT    NNODES > 1: the rendezvous port [29500]; on one node, when
#                  set, replaces torchrun --standalone
#   RDZV_ID        NNODES > 1: the rendezvous id, the same on every node
#                  [$ARCH-$RUN_NAME]
#   NODE_RANK      [0, below NNODES] not used by the launch, only in the name of
#                  the node's log: torchrun numbers the nodes itself once all have
#                  joined (whatever NODE_RANK says), and node n runs global ranks
#                  n*NUM_GPUS .. n*NUM_GPUS+NUM_GPUS-1 (rank 0, which logs
#                  training, may be on any node)
#   BEAM, LENPEN   generate: beam size and length penalty [4, 0.6; 4, 1.0 tiny]
#   REF            generate: plain-text reference [dirname($DATABIN)/raw/test.$TGT]
#   CHECKPOINT     generate, translate: a checkpoint file, or a folder to take
#                  checkpoint_best.pt (else checkpoint_last.pt) from [the run's folder]
#   VERBOSE        1 = fairseq's output on screen, no progress bar or log file [0]
#   BENCH_UPDATES  bench: updates per model [200 WMT, 30 tiny]
#   DRY_RUN        1 = print the commands instead of running them [0]
#   PYTHON         interpreter [<repo>/.venv/bin/python if present, else python3]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$repo/scripts/lib.sh"  # PYTHON, WORKSPACE_DEFAULT, die, run_tool, run_here, read_values, read_lines

note() { echo "run.sh: $*" >&2; }

# the variables that name a run, as the user gave them (the summary's translate command)
RUN_VARIABLES="WORKSPACE DATABIN SRC TGT OUT_DIR RUN_NAME ARCH DENSE RECIPE DEVICE NUM_EXPERTS TOP_K MOE_MODE EP_WORLD_SIZE NUM_GPUS NNODES CHECKPOINT"
given=""
for v in $RUN_VARIABLES; do if [[ -n ${!v:-} ]]; then given+=" $v=$(printf '%q' "${!v}")"; fi; done

MODE=train
if [[ $# -gt 0 && $1 != -* ]]; then
    case "$1" in
        train | generate | translate | bench) MODE="$1"; shift ;;
        test) MODE=generate; shift ;;  # the reference plugin's name
        help) sed -n '5,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown mode '$1': use train, generate (or test), translate, bench or help (fairseq options start with -)" ;;
    esac
fi

export DS_BUILD_OPS="${DS_BUILD_OPS:-0}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

is_int() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number (got '$2')"; }
dry() { [[ "${DRY_RUN:-0}" == 1 ]]; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# ---------------------------------------------------------------- device, processes
# GPUs torch can use (CUDA_VISIBLE_DEVICES applies); importing torch takes seconds,
# so only where a GPU driver is installed
gpu_count() {
    if command -v nvidia-smi > /dev/null || command -v rocm-smi > /dev/null || [[ -e /dev/nvidiactl || -e /dev/kfd ]]; then
        "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1
    else
        echo 0
    fi
}
DEVICE="${DEVICE:-auto}"
seen_gpus=""
if [[ $DEVICE == auto ]]; then
    seen_gpus="$(gpu_count)"
    if [[ "${seen_gpus:-0}" =~ ^[1-9][0-9]*$ ]]; then DEVICE=cuda; else DEVICE=cpu; fi
fi
[[ $DEVICE == cpu || $DEVICE == cuda ]] || die "DEVICE must be auto, cpu or cuda (got '$DEVICE')"
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=1
    if [[ $DEVICE == cuda ]]; then
        if [[ -z $seen_gpus ]]; then seen_gpus="$(gpu_count)"; fi
        if [[ "${seen_gpus:-0}" =~ ^[1-9][0-9]*$ ]]; then NUM_GPUS="$seen_gpus"; fi
    fi
fi
NNODES="${NNODES:-1}"
node_log="train.$(hostname).log"  # NNODES > 1: each node's agent writes its own log
if [[ -n ${NODE_RANK:-} ]]; then node_log="train.node$NODE_RANK.log"; fi
NODE_RANK="${NODE_RANK:-0}"
is_int NUM_GPUS "$NUM_GPUS"; is_int NNODES "$NNODES"; is_int NODE_RANK "$NODE_RANK"
[[ -z "${MASTER_PORT:-}" ]] || is_int MASTER_PORT "$MASTER_PORT"
((NUM_GPUS >= 1 && NNODES >= 1)) || die "NUM_GPUS and NNODES must be at least 1"
((NODE_RANK < NNODES)) || die "NODE_RANK $NODE_RANK must be below NNODES $NNODES"
WORLD=$((NNODES * NUM_GPUS))

trains() { [[ $MODE == train || $MODE == bench ]]; }  # (generate and translate: one process)
if ((NNODES > 1)) && trains; then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the address of one node, the same on every node: it hosts torchrun's rendezvous)"
fi

# ---------------------------------------------------------------- recipe
# mt_run/recipes.py: the tiny recipe (make demo's model) for transformer_ds_moe_tiny, the
# CPU default; the WMT recipe (Vaswani et al. base, the reference's batch) for every other
# ARCH; RECIPE=reference: the reference plugin's example command, corrected (said below).
# Its settings (recipe_<name>) are the defaults below; its flags come from train_cmd.
if [[ -n ${RECIPE:-} ]]; then
    [[ $RECIPE == tiny || $RECIPE == wmt || $RECIPE == reference ]] ||
        die "RECIPE must be tiny, wmt or reference (got '$RECIPE'); unset, ARCH and DEVICE choose"
    recipe=$RECIPE
elif [[ ${ARCH:-} == transformer_ds_moe_tiny || (-z ${ARCH:-} && $DEVICE == cpu) ]]; then
    recipe=tiny
else
    recipe=wmt
fi
read_values recipe mt_run.recipes "$recipe"

# ---------------------------------------------------------------- data
SRC="${SRC:-$recipe_src}"
TGT="${TGT:-$recipe_tgt}"
WORKSPACE="${WORKSPACE:-$WORKSPACE_DEFAULT}"
prepare=()
corpus="DATABIN"
if [[ -z "${DATABIN:-}" ]]; then
    # what prepare-wmt16ende.sh wrote under the same WORKSPACE (in either direction: its
    # joined dictionary serves both), else the demo corpus
    DATABIN="$WORKSPACE/wmt16_${SRC}_${TGT}/databin"
    if [[ ! -f "$DATABIN/dict.$SRC.txt" ]]; then DATABIN="$WORKSPACE/wmt16_${TGT}_${SRC}/databin"; fi
    corpus="WMT16, prepared by prepare-wmt16ende.sh, $SRC->$TGT"
    if [[ ! -f "$DATABIN/dict.$SRC.txt" ]]; then
        DATABIN="$WORKSPACE/demo_${SRC}_${TGT}/databin"
        corpus="the bundled demo corpus; for WMT16 run prepare-wmt16ende.sh with this WORKSPACE, or set DATABIN"
        prepare=("$PYTHON" "$repo/scripts/prepare_demo.py" --workspace "$WORKSPACE" --src "$SRC" --tgt "$TGT")
    fi
fi
note "data: $DATABIN ($corpus)"
OUT_DIR="${OUT_DIR:-$WORKSPACE/train_artifacts}"

# ---------------------------------------------------------------- model
ARCH="${ARCH:-$recipe_arch}"
DENSE="${DENSE:-0}"
[[ $DENSE == 0 || $DENSE == 1 ]] || die "DENSE must be 0 or 1 (got '$DENSE')"
if trains; then  # what training changes from the command the recipe follows
    read_lines corrections mt_run.recipes "$recipe" --corrections
    for c in ${corrections[@]+"${corrections[@]}"}; do
        if [[ $DENSE == 1 && $c == --loss-weights* ]]; then continue; fi  # (no gate loss)
        note "RECIPE=$recipe: $c"
    done
fi
NUM_EXPERTS="${NUM_EXPERTS:-$recipe_experts}"; MOE_FREQ="${MOE_FREQ:-$recipe_moe_freq}"
MAX_UPDATE="${MAX_UPDATE:-$recipe_max_update}"
BENCH_UPDATES="${BENCH_UPDATES:-$recipe_bench_updates}"
MOE_MODE="${MOE_MODE:-$recipe_moe_sides}"
TOP_K="${TOP_K:-$recipe_top_k}"
is_int NUM_EXPERTS "$NUM_EXPERTS"; is_int TOP_K "$TOP_K"
((NUM_EXPERTS >= 1)) || die "NUM_EXPERTS must be at least 1"
((TOP_K >= 1)) || die "TOP_K must be at least 1 (experts per token)"
if [[ -z "${EP_WORLD_SIZE:-}" ]]; then
    # the largest expert-parallel size that divides both: the experts split evenly, each
    # group within a node, and data parallelism over the rest
    EP_WORLD_SIZE=$NUM_GPUS rest=$NUM_EXPERTS
    while ((rest)); do r=$((EP_WORLD_SIZE % rest)); EP_WORLD_SIZE=$rest rest=$r; done
    if ((EP_WORLD_SIZE != NUM_GPUS)) && [[ $DENSE == 0 ]]; then
        if ((EP_WORLD_SIZE > 1)); then
            how="experts are split over $EP_WORLD_SIZE processes (their gcd) and copied over the rest"
        else
            how="they have no common divisor above 1: every process holds every expert"
        fi
        note "EP_WORLD_SIZE=$EP_WORLD_SIZE: NUM_GPUS=$NUM_GPUS does not divide NUM_EXPERTS=$NUM_EXPERTS, so $how; set EP_WORLD_SIZE to choose"
    fi
fi
is_int EP_WORLD_SIZE "$EP_WORLD_SIZE"
# what run.sh changes in the recipe; checked here, so a bad value stops before any work
recipe_overrides=(arch="$ARCH" moe_sides="$MOE_MODE" experts="$NUM_EXPERTS" top_k="$TOP_K"
                  moe_freq="$MOE_FREQ" ep_world_size="$EP_WORLD_SIZE")
read_values checked mt_run.recipes "$recipe" "${recipe_overrides[@]}"
if [[ $DEVICE == cpu ]]; then
    MAX_TOKENS="${MAX_TOKENS:-$recipe_max_tokens_cpu}"; FP16="${FP16:-0}"
else
    MAX_TOKENS="${MAX_TOKENS:-$recipe_max_tokens_gpu}"; FP16="${FP16:-1}"
fi
UPDATE_FREQ_SET="${UPDATE_FREQ:-}"  # (bench: 1 unless set)
UPDATE_FREQ="${UPDATE_FREQ:-$recipe_update_freq}"
SEED="${SEED:-43821}"

moe_name="moe_g${WORLD}_ep${EP_WORLD_SIZE}_ex${NUM_EXPERTS}_k${TOP_K}_${MOE_MODE//,/}"
if [[ $DENSE == 1 ]]; then RUN_NAME="${RUN_NAME:-baseline}"; else RUN_NAME="${RUN_NAME:-$moe_name}"; fi

device_args=()
if [[ $DEVICE == cpu ]]; then
    device_args=(--cpu --num-workers 0)
elif [[ $FP16 == 1 ]]; then
    device_args=(--fp16)
    # the plugin saves each rank's experts on their own: needs fp16 without a flat fp32 copy
    if ((EP_WORLD_SIZE > 1)) && [[ $DENSE == 0 ]]; then
        device_args+=(--memory-efficient-fp16)
        if [[ $recipe == reference ]] && trains; then
            note "RECIPE=reference: --memory-efficient-fp16 beside --fp16: the reference's --fp16 keeps one flat fp32 copy of all parameters, so each rank's experts could not be saved on their own"
        fi
    fi
fi

# json: every scalar in the log, which the console reads; VERBOSE=1: fairseq's console format
log_format=json
if [[ ${VERBOSE:-0} == 1 ]]; then log_format=simple; fi

# train_cmd DENSE SAVE_DIR TB_DIR: the training command line in the array `cmd`
# (no tensorboard logs when TB_DIR is empty)
train_cmd() {
    local dense="$1" save_dir="$2" tb_dir="$3" variant=() recipe_flags
    if [[ $dense == 1 ]]; then variant=(--dense); fi
    read_lines recipe_flags mt_run.recipes "$recipe" --flags \
        ${variant[@]+"${variant[@]}"} "${recipe_overrides[@]}"
    cmd=("${launch[@]}" "$repo/user/train.py" "$DATABIN" "${recipe_flags[@]}"
         --source-lang "$SRC" --target-lang "$TGT"
         --max-tokens "$MAX_TOKENS" --max-tokens-valid "$MAX_TOKENS"
         --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE"
         --seed "$SEED" --ddp-backend legacy_ddp ${device_args[@]+"${device_args[@]}"}
         --log-format "$log_format" --log-interval "$recipe_log_interval"
         --save-dir "$save_dir" --save-interval-updates "$recipe_save_interval"
         --keep-interval-updates 1)
    if [[ -n $recipe_keep_last_epochs ]]; then
        cmd+=(--keep-last-epochs "$recipe_keep_last_epochs")
    else
        cmd+=(--no-epoch-checkpoints)
    fi
    if [[ -n $recipe_validate_interval ]]; then
        cmd+=(--validate-interval-updates "$recipe_validate_interval")
    fi
    if [[ -n $tb_dir ]]; then cmd+=(--tensorboard-logdir "$tb_dir"); fi
}

prepare_data() {
    if ((${#prepare[@]})); then
        if dry; then
            show "${prepare[@]}"
        elif [[ $MODE == translate ]]; then
            "${prepare[@]}" > /dev/null 2>&1 || die "preparing the demo corpus failed: run 'bash run.sh' first"
        else
            mkdir -p "$(dirname "$DATABIN")"
            console step --name data --log "$(dirname "$DATABIN")/prepare.log" -- "${prepare[@]}"
        fi
    fi
    dry || [[ -f "$DATABIN/dict.$SRC.txt" ]] || die "DATABIN=$DATABIN holds no dict.$SRC.txt: is it a fairseq-preprocess output?"
}

# the launcher of training (train and bench; generate is one process)
launch=("$PYTHON")
if ! trains; then
    :
elif ((NNODES > 1)); then
    # torchrun's c10d rendezvous: the agents meet at MASTER_ADDR:MASTER_PORT in any
    # order, then it numbers the nodes (not NODE_RANK) and gives node n the global
    # ranks n*NUM_GPUS .. n*NUM_GPUS+NUM_GPUS-1
    launch=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NUM_GPUS"
            --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
            --rdzv_id "${RDZV_ID:-$ARCH-$RUN_NAME}")
elif ((NUM_GPUS > 1)); then
    if [[ -n "${MASTER_PORT:-}" ]]; then
        launch=("$PYTHON" -m torch.distributed.run --nnodes 1 --node_rank 0
                --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" --nproc_per_node "$NUM_GPUS")
    else
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS")
    fi
fi

SAVE_DIR="$OUT_DIR/checkpoints/$ARCH-$RUN_NAME"
TB_DIR="$OUT_DIR/tb/$ARCH-$RUN_NAME"

# console STAGE ARGS -- CMD: a stage's output to its log, its progress on screen
# (mt_run/console.py); VERBOSE=1: the command as it is
console() {
    if [[ ${VERBOSE:-0} == 1 ]]; then  # (train runs its command itself)
        while [[ $1 != -- ]]; do shift; done
        shift
        "$@"
    else
        run_here mt_run.console "$@"
    fi
}

do_train() {
    prepare_data
    train_cmd "$DENSE" "$SAVE_DIR" "$TB_DIR"
    cmd+=("$@")
    if dry; then show "${cmd[@]}"; return; fi
    if [[ -f "$SAVE_DIR/checkpoint_last.pt" ]]; then
        note "resuming from $SAVE_DIR/checkpoint_last.pt"
    fi
    local log="$SAVE_DIR/train.log" t0=$SECONDS
    if ((NNODES > 1)); then log="$SAVE_DIR/$node_log"; fi  # (one writer a file)
    mkdir -p "$SAVE_DIR"
    note "training $ARCH-$RUN_NAME on $DEVICE, $WORLD process(es) -> $SAVE_DIR"
    if [[ ${VERBOSE:-0} == 1 ]]; then "${cmd[@]}"; return; fi
    note "fairseq's output: $log"
    console train --log "$log" -- "${cmd[@]}"  # (the last --max-update is the budget)
    summary --log "$log" --out-dir "$SAVE_DIR" --stage "train=$((SECONDS - t0))" \
        --checkpoint "$SAVE_DIR/checkpoint_last.pt" --processes "$WORLD" --record-machine
}

# summary ARGS: mt_run.report's summary of this run (the pictures too); a failure to draw
# it leaves the run's result as it is
summary() {
    run_here mt_run.report --title "$ARCH-$RUN_NAME" --device "$DEVICE" \
        --translate "$(translate_hint)" "$@" || note "the summary failed (the run itself is done)"
}

# a command that translates one's own sentence with this run's checkpoint
translate_hint() {
    local script="$repo/run.sh"
    if [[ $PWD == "$repo" ]]; then script=run.sh; fi
    echo "${given# }${given:+ }bash $(printf '%q' "$script") translate \"Select the file.\""
}

# the checkpoint generate and translate use: CHECKPOINT (a file, or a folder), else the
# run's; checkpoint_best.pt, else checkpoint_last.pt
find_checkpoint() {
    local dir="${CHECKPOINT:-$SAVE_DIR}"
    if [[ -n ${CHECKPOINT:-} && ! -d $CHECKPOINT ]]; then
        dry || [[ -f $CHECKPOINT ]] || die "CHECKPOINT=$CHECKPOINT is neither a file nor a folder"
        ckpt="$CHECKPOINT"
        return
    fi
    ckpt="$dir/checkpoint_best.pt"
    [[ -f $ckpt ]] || ckpt="$dir/checkpoint_last.pt"
    dry || [[ -f $ckpt ]] || die "no checkpoint_best.pt or checkpoint_last.pt in $dir: train first (same variables), or set CHECKPOINT"
}

# fairseq-generate's and fairseq-interactive's common flags, in `cmd`
decode_cmd() {
    cmd=("$PYTHON" "$repo/user/$1.py" "$DATABIN"
         --task translation_deepspeed --source-lang "$SRC" --target-lang "$TGT" --path "$ckpt"
         --beam "${BEAM:-$recipe_beam}" --lenpen "${LENPEN:-$recipe_lenpen}"
         --max-len-a "$recipe_max_len_a" --max-len-b "$recipe_max_len_b" --batch-size 64)
    if [[ -f "$DATABIN/spm.model" ]] || dry; then
        cmd+=(--bpe sentencepiece --sentencepiece-model "$DATABIN/spm.model")
    fi
    if [[ $DEVICE == cpu ]]; then cmd+=(--cpu --num-workers 0); elif [[ $FP16 == 1 ]]; then cmd+=(--fp16); fi
}

do_generate() {
    prepare_data
    local ckpt
    find_checkpoint
    local out
    out="$(dirname "$ckpt")"  # generate writes beside its checkpoint: the run's folder
    local gen="$out/generate-test.txt" ref="${REF:-$(dirname "$DATABIN")/raw/test.$TGT}"
    decode_cmd generate
    cmd+=(--gen-subset test "$@")
    local score=(bash "$repo/scripts/sacrebleu.sh" "$gen" "$ref" "$SRC" "$TGT")
    if dry; then show "${cmd[@]}"; show "${score[@]}"; return; fi
    note "translating the test split with $ckpt"
    local t0=$SECONDS t_gen t_score
    if [[ ${VERBOSE:-0} == 1 ]]; then
        "${cmd[@]}" > "$gen.tmp"
        mv "$gen.tmp" "$gen"
    else
        console generate --log "$out/generate.log" --out "$gen" -- "${cmd[@]}"
    fi
    t_gen=$((SECONDS - t0))
    note "translations in $gen"
    local scored=() t_score
    if [[ -f $ref ]]; then
        t0=$SECONDS
        "${score[@]}" | tee "$out/generate-test.bleu"
        t_score=$((SECONDS - t0))
        scored=(--stage "score=$t_score" --bleu "$(cat "$out/generate-test.bleu")"
                --source "$(dirname "$ref")/test.$SRC" --reference "$ref")
    else
        note "no reference $ref: set REF to the plain-text test.$TGT to score"
    fi
    [[ ${VERBOSE:-0} == 1 ]] && return
    echo
    summary --log "$out/train.log" --also-log "$out/generate.log" --out-dir "$out" \
        --stage "translate=$t_gen" ${scored[@]+"${scored[@]}"} --checkpoint "$ckpt" \
        --translations "$gen"
}

do_translate() {
    local text=()
    while [[ $# -gt 0 && $1 != -* ]]; do text+=("$1"); shift; done
    prepare_data
    local ckpt
    find_checkpoint
    decode_cmd interactive
    local buffer=64
    if ((${#text[@]} == 0)) && [[ -t 0 ]]; then buffer=1; fi  # typed: each line at once
    cmd+=(--buffer-size "$buffer" --batch-size "$buffer" --input - "$@")
    if dry; then show "${cmd[@]}"; return; fi
    local out
    out="$(dirname "$ckpt")"
    if ((${#text[@]})); then
        printf '%s\n' "${text[@]}" | run_here mt_run.console translate --log "$out/translate.log" -- "${cmd[@]}"
    else
        [[ ! -t 0 ]] || note "translating what you type, one sentence a line (Ctrl-D ends)"
        run_here mt_run.console translate --log "$out/translate.log" -- "${cmd[@]}"
    fi
}

do_bench() {
    prepare_data
    local kind dense runs=() dir
    mkdir -p "$OUT_DIR/bench"
    dir="$(cd "$OUT_DIR/bench" && pwd)"
    for kind in dense moe; do
        if [[ $kind == dense ]]; then dense=1; else dense=0; fi
        train_cmd "$dense" "$OUT_DIR/bench/$ARCH-$kind" ""
        # one batch an update unless UPDATE_FREQ says otherwise: tokens/s, not the recipe's
        # 16x larger updates
        cmd+=(--max-update "$BENCH_UPDATES" --update-freq "${UPDATE_FREQ_SET:-1}"
              --no-save --disable-validation --log-interval 1 "$@")
        if dry; then show "${cmd[@]}"; continue; fi
        local log="$OUT_DIR/bench/$ARCH-$kind.log"
        note "bench: $kind, $BENCH_UPDATES updates -> $log"
        "${cmd[@]}" > "$log" 2>&1 || { tail -n 30 "$log" >&2; die "bench: the $kind run failed (log: $log)"; }
        runs+=("$kind" "$dir/${log##*/}")
    done
    dry && return
    echo "bench: $ARCH on $DEVICE, $WORLD process(es), MAX_TOKENS $MAX_TOKENS, UPDATE_FREQ $UPDATE_FREQ, $BENCH_UPDATES updates;"
    echo "       MoE: $MOE_MODE, $NUM_EXPERTS experts, top-$TOP_K, MOE_FREQ $MOE_FREQ, EP $EP_WORLD_SIZE"
    run_tool mt_run.wps_table "${runs[@]}"  # the table, from the logs
}

case "$MODE" in
    train) do_train "$@" ;;
    generate) do_generate "$@" ;;
    translate) do_translate "$@" ;;
    bench) do_bench "$@" ;;
esac
