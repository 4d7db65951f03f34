#!/usr/bin/env bash
# MIT License
# Copyright (c) the fairseq-moe plugin authors
#
# End-to-end CPU demo (`make demo`, 4 to 10 minutes on 2 cores): prepare the
# bundled LibreOffice en->de corpus, train a small DeepSpeed MoE Transformer
# (MoE in encoder and decoder), translate the test split with beam search and
# print detokenized sacreBLEU (with its signature) next to the copy-the-source
# baseline on the same test split. On screen, a line per stage and a progress
# bar (mt_run/console.py; plain lines off a terminal), then a summary with the
# time per stage, the files, the pictures (valid.png, experts.png), the machine
# and a command that translates one's own sentence (mt_run/report.py); fairseq's
# full output goes to train.log and generate.log in the run folder.
#
# The defaults are tuned for a CPU and a few minutes: a 64-wide model (the
# softmax over the 7.9k-piece vocabulary, not the layers, dominates the cost
# per token), small batches (more updates per CPU second: what a model this
# short of training needs most), a high learning rate with a short warmup, no
# dropout (training sees each sentence about twice). MAX_UPDATE is the
# stopping criterion, so the BLEU is reproducible on one machine (13.62 on the
# test split here; other CPUs' kernels give other numbers: README, "What the score
# depends on"); TRAIN_MINUTES only caps a run on a slow or busy machine (it then
# says so, and the BLEU is lower). The MoE settings are make study's pick
# (docs/quality.md): top-2 of 4 experts 128 wide, no token dropped in training, a
# balancing bias beside the gate loss.
#
# Environment overrides (defaults in brackets; the model's and its training's are
# the tiny recipe's, in mt_run/recipes.py, also run.sh's CPU default):
#   WORKSPACE      output root [<repo>/workspace]; data in $WORKSPACE/demo_en_de
#   ARCH           transformer_ds_moe_* architecture [transformer_ds_moe_tiny]
#   DIM            embedding size, shared by encoder and decoder [64]
#   FFN_DIM        expert hidden size [128]
#   LAYERS         encoder and decoder layers (each) [2]
#   HEADS          attention heads [4]
#   MOE_SIDES      --deepspeed_moe value [enc,dec]
#   NUM_EXPERTS    experts per MoE layer [4]
#   TOP_K          experts per token [2]
#   MOE_FREQ       every MOE_FREQ-th layer is MoE [1]
#   GATE_WEIGHT    weight of experts_gate_loss in --loss-weights [0.01]
#   CAPACITY_FACTOR  --moe-capacity-factor in training [the recipe's]
#   DROP_TOKENS    0: dropless training (--no-moe-drop-tokens); 1: drop over capacity
#                  [0]
#   Z_LOSS_WEIGHT  router z-loss: --moe-z-loss with this weight of experts_z_loss
#                  [the recipe's; empty: off]
#   EOM            expert output masking probability, --moe-eom [the recipe's]
#   BIAS_BALANCE   balancing bias rate, --moe-bias-balance [the recipe's; empty: off]
#   LR, WARMUP     peak learning rate and inverse_sqrt warmup updates [0.007, 100]
#   DROPOUT        [0.0]
#   LABEL_SMOOTHING  [0.1]
#   MAX_TOKENS     tokens per batch [1024]
#   MAX_UPDATE     update budget: training stops here [2000]
#   TRAIN_MINUTES  safety cap on the training time: training stops at whichever
#                  of MAX_UPDATE and TRAIN_MINUTES comes first [9]
#   SAVE_INTERVAL  validate and checkpoint every SAVE_INTERVAL updates [500]
#   BEAM, LENPEN   beam size and length penalty [4, 1.0]
#   MAX_LEN_A, MAX_LEN_B  hypotheses stop at A * source length + B tokens [1.2, 10]
#   THREADS        CPU threads for torch [$OMP_NUM_THREADS, else 1]; THREADS=2
#                  can help only on an otherwise idle machine (at best about
#                  1.3x faster for 1.5x the CPU); on a busy one, two spinning
#                  OpenMP threads are several times slower than one
#   SAVE_DIR       checkpoints and logs [$WORKSPACE/demo_en_de/ckpt_<config>]
#   PYTHON         interpreter [.venv/bin/python if present, else python3]
# Unless already set, MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ keep
# glibc from returning and re-faulting the large per-batch buffers (about 20%
# less CPU per update).
#
# Resume: the checkpoint folder is named after the model and MoE settings, so a
# rerun with the same settings continues from its checkpoint_last.pt (fairseq
# restores the updates, the optimizer and the training time already spent, so
# TRAIN_MINUTES stays a total: raise it to finish a run the cap stopped), and a
# run whose budget is spent goes straight to translation. Other settings get a
# fresh folder. Data preparation is idempotent (scripts/prepare_demo.py skips
# finished steps; its log: $WORKSPACE/demo_en_de/prepare.log). The training log
# is appended to $SAVE_DIR/train.log.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source scripts/lib.sh  # PYTHON, WORKSPACE_DEFAULT, die, run_tool, read_values, read_lines

read_values tiny mt_run.recipes tiny
WORKSPACE="${WORKSPACE:-$WORKSPACE_DEFAULT}"
ARCH="${ARCH:-$tiny_arch}"
DIM="${DIM:-$tiny_dim}"
FFN_DIM="${FFN_DIM:-$tiny_ffn}"
LAYERS="${LAYERS:-$tiny_layers}"
HEADS="${HEADS:-$tiny_heads}"
MOE_SIDES="${MOE_SIDES:-$tiny_moe_sides}"
NUM_EXPERTS="${NUM_EXPERTS:-$tiny_experts}"
TOP_K="${TOP_K:-$tiny_top_k}"
MOE_FREQ="${MOE_FREQ:-$tiny_moe_freq}"
GATE_WEIGHT="${GATE_WEIGHT:-$tiny_gate_weight}"
CAPACITY_FACTOR="${CAPACITY_FACTOR-$tiny_capacity_factor}"
DROP_TOKENS="${DROP_TOKENS:-$tiny_drop_tokens}"
Z_LOSS_WEIGHT="${Z_LOSS_WEIGHT-$tiny_z_loss_weight}"
EOM="${EOM-$tiny_eom}"
BIAS_BALANCE="${BIAS_BALANCE-$tiny_bias_balance}"
LR="${LR:-$tiny_lr}"
WARMUP="${WARMUP:-$tiny_warmup}"
DROPOUT="${DROPOUT:-$tiny_dropout}"
LABEL_SMOOTHING="${LABEL_SMOOTHING:-$tiny_label_smoothing}"
MAX_TOKENS="${MAX_TOKENS:-$tiny_max_tokens_cpu}"
MAX_UPDATE="${MAX_UPDATE:-$tiny_max_update}"
TRAIN_MINUTES="${TRAIN_MINUTES:-9}"
SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
BEAM="${BEAM:-$tiny_beam}"
LENPEN="${LENPEN:-$tiny_lenpen}"
MAX_LEN_A="${MAX_LEN_A:-$tiny_max_len_a}"
MAX_LEN_B="${MAX_LEN_B:-$tiny_max_len_b}"
read_lines model mt_run.recipes tiny --flags arch="$ARCH" dim="$DIM" ffn="$FFN_DIM" \
    layers="$LAYERS" heads="$HEADS" moe_sides="$MOE_SIDES" experts="$NUM_EXPERTS" \
    top_k="$TOP_K" moe_freq="$MOE_FREQ" gate_weight="$GATE_WEIGHT" lr="$LR" warmup="$WARMUP" \
    dropout="$DROPOUT" label_smoothing="$LABEL_SMOOTHING" capacity_factor="$CAPACITY_FACTOR" \
    drop_tokens="$DROP_TOKENS" z_loss_weight="$Z_LOSS_WEIGHT" eom="$EOM" \
    bias_balance="$BIAS_BALANCE"
THREADS="${THREADS:-${OMP_NUM_THREADS:-1}}"

export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" DS_BUILD_OPS="${DS_BUILD_OPS:-0}"

data="$WORKSPACE/demo_en_de"
databin="$data/databin"
config="${ARCH}_d${DIM}_f${FFN_DIM}_l${LAYERS}_${MOE_SIDES/,/}_e${NUM_EXPERTS}_k${TOP_K}_m${MOE_FREQ}_gw${GATE_WEIGHT}"
# and the router settings, when given: a run with other ones starts afresh
[[ -n "$CAPACITY_FACTOR" ]] && config+="_cf$CAPACITY_FACTOR"
[[ "$DROP_TOKENS" == 0 ]] && config+="_dropless"
[[ -n "$Z_LOSS_WEIGHT" ]] && config+="_z$Z_LOSS_WEIGHT"
[[ -n "$EOM" ]] && config+="_eom$EOM"
[[ -n "$BIAS_BALANCE" ]] && config+="_bb$BIAS_BALANCE"
SAVE_DIR="${SAVE_DIR:-$data/ckpt_$config}"
stop_hours="$("$PYTHON" -c "import sys; print(float(sys.argv[1]) / 60)" "$TRAIN_MINUTES")"
start=$SECONDS
console() { run_tool mt_run.console "$@"; }  # a stage: its output to a log, its progress here

echo "demo: $config, $MAX_UPDATE updates (cap $TRAIN_MINUTES min), $THREADS thread(s) -> $SAVE_DIR"
mkdir -p "$data" "$SAVE_DIR"
t0=$SECONDS
console step --name data --log "$data/prepare.log" -- \
    "$PYTHON" "$repo/scripts/prepare_demo.py" --workspace "$WORKSPACE"
t_prepare=$((SECONDS - t0))

log="$SAVE_DIR/train.log"
echo "demo: fairseq's full logs: $log (training), $SAVE_DIR/generate.log (translation)"
touch "$log"
log_from=$(($(wc -l < "$log") + 1))
t0=$SECONDS
console train --log "$log" --updates "$MAX_UPDATE" -- \
    "$PYTHON" user/train.py "$databin" "${model[@]}" --source-lang en --target-lang de \
    --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --stop-time-hours "$stop_hours" \
    --num-workers 0 --seed 1 --cpu \
    --log-format json --log-interval 10 \
    --save-dir "$SAVE_DIR" --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 1 \
    --no-epoch-checkpoints
t_train=$((SECONDS - t0))
# this run's part of the log: updates reached (run_updates)
read_values run mt_run.fairseq_log summary - <<< "$(tail -n "+$log_from" "$log")"
updates=$run_updates
if [[ "$updates" -lt "$MAX_UPDATE" ]]; then
    echo "demo: WARNING: the $TRAIN_MINUTES-minute cap stopped training at update $updates of" \
        "$MAX_UPDATE (slow or busy machine): expect a lower BLEU; rerun with a larger TRAIN_MINUTES to finish"
fi

t0=$SECONDS
gen="$SAVE_DIR/generate-test.txt"
console generate --log "$SAVE_DIR/generate.log" --out "$gen" -- \
    "$PYTHON" user/generate.py "$databin" \
    --task translation_deepspeed --source-lang en --target-lang de \
    --path "$SAVE_DIR/checkpoint_last.pt" --gen-subset test \
    --beam "$BEAM" --lenpen "$LENPEN" --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" \
    --max-tokens 8000 --bpe sentencepiece --sentencepiece-model "$databin/spm.model" \
    --num-workers 0 --cpu
t_gen=$((SECONDS - t0))

t0=$SECONDS
bleu="$(bash scripts/sacrebleu.sh "$gen" "$data/raw/test.de" en de --write-hyp "$SAVE_DIR/test.hyp.de")"
t_score=$((SECONDS - t0))
printf '%-10s %s\n' score "${bleu%% (*}"
echo
run_tool mt_run.report --log "$log" --also-log "$SAVE_DIR/generate.log" --out-dir "$SAVE_DIR" --title "make demo: $config" \
    --stage "prepare=$t_prepare" --stage "train=$t_train" --stage "translate=$t_gen" \
    --stage "score=$t_score" --bleu "$bleu" --source "$data/raw/test.en" --reference "$data/raw/test.de" \
    --checkpoint "$SAVE_DIR/checkpoint_last.pt" --translations "$SAVE_DIR/test.hyp.de" \
    --translate "$(printf 'CHECKPOINT=%q DATABIN=%q bash %q translate "Select the file."' \
        "$(cd "$SAVE_DIR" && pwd)/checkpoint_last.pt" "$(cd "$databin" && pwd)" "$repo/run.sh")"
