#!/bin/bash
# Recaption a folder of parquet shards with a SLURM array: one task per GPU, task I of K takes every K-th
# shard (by name), so the array covers every shard exactly once. Kill it and resubmit at will: finished
# shards are skipped, unfinished ones are redone.
#
#   INPUT=/data/cc12m OUTPUT=/data/cc12m_recaptioned sbatch --array=0-15 data/recaption_SLURM.sh --hint-column caption
#
# Submit from the repository root (or set REPO_DIR). Extra arguments go to data/recaption_parquets.py.
# Environment (all optional except INPUT and OUTPUT):
#   VLM, LLM            local directories or hub ids (defaults below)
#   BATCH_SIZE          rows per generate call (default 16)
#   PYTHON              interpreter (default: python)
#   HF_TOKEN            read by huggingface_hub from the environment for gated models; never put it here
#   DRY_RUN=1           print the command this task would run, and exit
#SBATCH --job-name=recaption
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=recaption_%A_%a.out
set -euo pipefail

: "${INPUT:?set INPUT to the folder of input parquet shards}"
: "${OUTPUT:?set OUTPUT to the folder for the recaptioned shards}"
VLM="${VLM:-llava-hf/llama3-llava-next-8b-hf}"
LLM="${LLM:-meta-llama/Meta-Llama-3-8B-Instruct}"
BATCH_SIZE="${BATCH_SIZE:-16}"
PYTHON="${PYTHON:-python}"
# sbatch runs a copy of this file from its spool folder, so find the repository from the submit folder.
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
SCRIPT="$REPO_DIR/data/recaption_parquets.py"
if [[ ! -f "$SCRIPT" ]]; then
    echo "recaption_SLURM.sh: $SCRIPT not found; submit from the repository root or set REPO_DIR" >&2
    exit 2
fi

cmd=("$PYTHON" "$SCRIPT" --input "$INPUT" --output "$OUTPUT" --vlm "$VLM" --llm "$LLM"
     --num-shards "${SLURM_ARRAY_TASK_COUNT:-1}" --shard-index "${SLURM_ARRAY_TASK_ID:-0}"
     --batch-size "$BATCH_SIZE" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
echo "recaption task ${SLURM_ARRAY_TASK_ID:-0} of ${SLURM_ARRAY_TASK_COUNT:-1} on $(hostname): ${cmd[*]}"
exec "${cmd[@]}"
