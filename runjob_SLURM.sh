#!/bin/bash
# Train on a SLURM cluster: one srun task per node runs torchrun with that node's GPUs; the torchrun
# instances meet at a c10d rendezvous on the first node of the allocation.
#
#   mkdir -p logs          # once: SLURM opens --output before this script runs and does not make the folder
#   sbatch runjob_SLURM.sh                                   # 1 node, preset sd3_256, run dir runs/<job name>
#   sbatch --nodes=4 --job-name=sd3_256 runjob_SLURM.sh --data.batch_size=120
#   PRESET=sd3_512 RUN_DIR=runs/sd3_512 sbatch runjob_SLURM.sh --init_from=runs/sd3_256/<checkpoint>
#   DRY_RUN=1 bash runjob_SLURM.sh ...   # inside an allocation (or a faked SLURM environment): print the
#                                        # commands it would run, start nothing
#
# Arguments after the script name go to src/train.py unchanged. Settings read from the environment
# (sbatch passes your shell's environment to the job):
#   PRESET          config preset (default sd3_256)
#   RUN_DIR         run directory (default runs/$SLURM_JOB_NAME: the same job name resumes the same run)
#   RDZV_PORT       rendezvous port on the head node (default 29504, the seed's)
#   RDZV_HOST       rendezvous address (default: the head node's hostname; set an IP if names do not resolve)
#   NPROC_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else 8 as in the header)
#   MAX_REQUEUES    requeues this script may do for one submission (default 20; 0: never requeue)
#   DRY_RUN=1       print the commands and the requeue rule, run nothing
# Secrets come from the environment only, never from this file: export WANDB_API_KEY (or
# WANDB_MODE=offline) and HF_TOKEN in your shell before sbatch.
#
# Time limit and preemption. SLURM ends a job step with SIGTERM to every process in it and SIGKILL
# KillWait seconds later (30 s by default), which may be too short to write a checkpoint. So:
#   1. `--signal=B:USR1@120` sends SIGUSR1 to this batch shell alone 120 s before the time limit
#      (up to 60 s earlier: SLURM checks every minute).
#   2. The trap below forwards it with `scancel --signal=USR1 $SLURM_JOB_ID`, which signals every
#      process of the job step but not this shell: torchrun and its workers on every node.
#   3. torchrun would die of SIGUSR1 (it does not handle it) and take its workers down, so each srun
#      task starts it under `trap "" USR1`: an ignored signal stays ignored across exec, so torchrun
#      ignores it, while the Python workers install their own SIGUSR1 handler, stop at the next step
#      boundary, write a whole checkpoint and `<run_dir>/PREEMPTED`, and exit 0.
#   4. When the step has ended, this shell decides, and says which case it saw in one log line:
#      - requeue (`scontrol requeue`: the job keeps its id and name, appends to the same log, and
#        `--resume=auto`, always passed, continues from the latest whole checkpoint) ONLY when the step
#        exited 0 AND `<run_dir>/PREEMPTED` exists (train.py writes it only when a model rank stopped on
#        a signal and the whole stop completed cleanly) AND the stop was asked for by SIGUSR1: this
#        shell's trap got the time-limit warning, or, with no signal to this shell, someone sent USR1
#        to the step itself (`scancel --signal=USR1 <jobid>`). A marker that names SIGTERM is no USR1
#        stop (torchrun SIGTERMs the surviving workers when one of them dies);
#      - a SIGTERM to this shell (scancel, preemption) never requeues from here: a cancelled job stays
#        cancelled, and SLURM requeues preemptions itself (--requeue);
#      - any other non-zero exit of the step is a failure, also after the time-limit warning: no
#        requeue, exit with the step's status, and print `<run_dir>/FAILED` (the run's own one-line
#        reason) when train.py wrote one. A loader killed by the OOM killer fails the same way on every
#        try, so requeueing it would loop forever;
#      - at most MAX_REQUEUES requeues (SLURM_RESTART_COUNT counts them): at the limit, exit non-zero.
#      The marker is removed once the step has ended, and both files before it starts, so neither
#      fools a later job.
# The workers see the forwarded signal when SLURM tracks a step's processes by cgroup or by process
# tree (proctrack/cgroup, proctrack/linuxproc); with proctrack/pgid torchrun's workers, which it
# starts in their own sessions, would not be reached.
#
#SBATCH --job-name=sd3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
##SBATCH --partition=gpu        (examples: remove one '#' to use)
##SBATCH --account=my_project
##SBATCH --exclusive

# Not `set -e`: srun's exit status and a `wait` cut short by a signal are handled below.
set -uo pipefail

GPUS_PER_NODE_DEFAULT=8   # keep equal to --gpus-per-node above (used when SLURM_GPUS_ON_NODE is unset)

log() { printf '[runjob %s] %s\n' "$(date '+%F %T')" "$*"; }
die() { log "error: $*" >&2; exit 2; }

# One command per line, each argument shell-quoted only where it needs it, so it can be pasted back.
quote_cmd() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  printf '%s\n' "${out[*]}"
}

# The run directory train.py will use: RUN_DIR, unless the arguments set --run_dir (the last one wins).
run_dir_of() {
  local dir=$1
  shift
  while (( $# )); do
    case $1 in
      --run_dir=* | --run-dir=*) dir=${1#*=} ;;
      --run_dir | --run-dir) if (( $# > 1 )); then dir=$2; shift; fi ;;
    esac
    shift
  done
  printf '%s' "$dir"
}

# Wait for a background process; a trapped signal makes `wait` return early (status > 128) while the
# process still runs, so wait again until it has really ended, and return its own exit status.
wait_for() {
  local pid=$1 rc again
  while :; do
    wait "$pid"
    rc=$?
    if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  # If it ended between the early return and `kill -0`, its status is still waiting to be collected.
  wait "$pid"
  again=$?
  if (( again != 127 )); then rc=$again; fi
  return "$rc"
}

# -- the allocation ------------------------------------------------------------------------------
DRY_RUN=${DRY_RUN:-0}
for var in SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST; do
  [[ -n ${!var:-} ]] || die "$var is not set: submit with 'sbatch runjob_SLURM.sh [args]' (or, for DRY_RUN=1, run inside an allocation or export a fake SLURM environment)"
done
JOB_NAME=${SLURM_JOB_NAME:-sd3}
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR" || die "cannot cd to the submit directory $SUBMIT_DIR"

command -v scontrol >/dev/null || die "scontrol not found: run this inside a SLURM job"
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
(( ${#HOSTS[@]} > 0 )) || die "'scontrol show hostnames $SLURM_JOB_NODELIST' printed no host"
(( ${#HOSTS[@]} == SLURM_NNODES )) \
  || die "SLURM_NNODES=$SLURM_NNODES but $SLURM_JOB_NODELIST expands to ${#HOSTS[@]} hosts (${HOSTS[*]})"
HEAD_NODE=${HOSTS[0]}
RDZV_HOST=${RDZV_HOST:-$HEAD_NODE}
RDZV_PORT=${RDZV_PORT:-29504}

NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$GPUS_PER_NODE_DEFAULT}}
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] \
  || die "processes per node '$NPROC_PER_NODE' is not a positive int (set NPROC_PER_NODE, or --gpus-per-node)"
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE}

PRESET=${PRESET:-sd3_256}
RUN_DIR=${RUN_DIR:-runs/$JOB_NAME}
EFFECTIVE_RUN_DIR=$(run_dir_of "$RUN_DIR" "$@")
[[ -n $EFFECTIVE_RUN_DIR ]] || die "the run directory is empty: set RUN_DIR or --run_dir=DIR"
MARKER=$EFFECTIVE_RUN_DIR/PREEMPTED   # train.py: a model rank stopped on a signal, and the stop completed cleanly
FAILED=$EFFECTIVE_RUN_DIR/FAILED      # train.py, when it can name why a model rank failed: that reason, one line

MAX_REQUEUES=${MAX_REQUEUES:-20}
[[ $MAX_REQUEUES =~ ^[0-9]+$ ]] \
  || die "MAX_REQUEUES='$MAX_REQUEUES' is not a whole number (requeues allowed per submission, default 20; 0: never)"
RESTARTS=${SLURM_RESTART_COUNT:-0}   # SLURM counts this job's requeues; unset before the first one
[[ $RESTARTS =~ ^[0-9]+$ ]] || die "SLURM_RESTART_COUNT='$RESTARTS' is not a whole number"

# -- environment of every worker -------------------------------------------------------------------
ENV_NAMES=()
setenv() { export "$1=$2"; ENV_NAMES+=("$1"); }
# torchrun sets 1 thread per worker when this is unset; give each worker its share of the task's CPUs
# (image decoding on loader ranks uses its own thread pool, sized by --data.decode_workers).
setenv OMP_NUM_THREADS "${OMP_NUM_THREADS:-$(( CPUS_PER_NODE / NPROC_PER_NODE > 0 ? CPUS_PER_NODE / NPROC_PER_NODE : 1 ))}"
# A rank whose peer died or hangs aborts its NCCL communicator and raises once --ranks.timeout_s has
# passed, so the job ends (and can be requeued) instead of hanging until the time limit.
setenv TORCH_NCCL_ASYNC_ERROR_HANDLING "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Warnings and errors only; set NCCL_DEBUG=INFO in your shell to see the chosen transports and rings.
setenv NCCL_DEBUG "${NCCL_DEBUG:-WARN}"
# Log lines reach logs/%x-%j.out as they are printed, not when a buffer fills.
setenv PYTHONUNBUFFERED 1
# Cluster-specific network settings, set in your shell before sbatch when needed, e.g.:
#   export NCCL_SOCKET_IFNAME=ib0        # bootstrap over this interface when the default route is wrong
#   export NCCL_IB_HCA=mlx5              # only these InfiniBand adapters
#   export NCCL_IB_DISABLE=1             # no InfiniBand: TCP sockets only (slow; for debugging)

# -- the commands ----------------------------------------------------------------------------------
TRAIN=(src/train.py --preset="$PRESET" --run_dir="$RUN_DIR" --resume=auto "$@")
TORCHRUN=(python -m torch.distributed.run
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID"
  --max_restarts=0)   # a failed worker ends the job; the requeue + --resume=auto path restarts it
SRUN=(srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun no longer inherits --cpus-per-task from sbatch (SLURM 22.05+): without it the task gets 1 CPU.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# `trap "" USR1` then exec: torchrun starts with SIGUSR1 ignored (see the top of this file).
SRUN+=(bash -c 'trap "" USR1; exec "$@"' sd3-node "${TORCHRUN[@]}" "${TRAIN[@]}")
FORWARD=(scancel --signal=USR1 "$SLURM_JOB_ID")
REQUEUE=(scontrol requeue "$SLURM_JOB_ID")

if [[ $DRY_RUN != 0 ]]; then
  echo "# DRY_RUN=1: runjob_SLURM.sh would run these commands (nothing was started)"
  quote_cmd cd "$SUBMIT_DIR"
  if [[ -f .venv/bin/activate ]]; then echo "source .venv/bin/activate"; fi
  for name in "${ENV_NAMES[@]}"; do quote_cmd export "$name=${!name}"; done
  quote_cmd "${SRUN[@]}"
  echo "# on SIGUSR1 (the time-limit warning, sent to this shell only): $(quote_cmd "${FORWARD[@]}")"
  echo "# when the step has ended: $(quote_cmd "${REQUEUE[@]}") ONLY if the step exited 0, $MARKER exists"
  echo "#   (not naming SIGTERM) and the stop was asked for by SIGUSR1: the time-limit warning to this shell, or"
  echo "#   $(quote_cmd "${FORWARD[@]}") by hand while this shell got no signal;"
  echo "#   and only while SLURM_RESTART_COUNT ($RESTARTS) < MAX_REQUEUES ($MAX_REQUEUES), else exit 1"
  echo "# SIGTERM to this shell (scancel, preemption): never requeued from here, exit with the step's status"
  echo "# any other non-zero exit of the step (also after SIGUSR1) is a failure: no requeue, exit with its status,"
  echo "#   print $FAILED when present"
  echo "# $MARKER and $FAILED are removed before the step starts; $MARKER again once it has ended"
  exit 0
fi

# -- run ---------------------------------------------------------------------------------------------
if [[ -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091  # the project's own virtual environment, made by the user
  source .venv/bin/activate
fi

GOT_USR1=0
GOT_TERM=0
# shellcheck disable=SC2317,SC2329  # called by the trap below
on_usr1() {
  GOT_USR1=1
  log "SIGUSR1: the time limit is near; telling every worker to checkpoint at the next step boundary and stop"
  "${FORWARD[@]}" || log "'${FORWARD[*]}' failed: the workers will only be stopped by SIGTERM at the time limit"
}
# shellcheck disable=SC2317,SC2329  # called by the trap below
on_term() {
  GOT_TERM=1
  # SLURM signals the step's processes itself and kills them KillWait seconds later; this shell only
  # has to stay alive so the job does not end before the workers have written their checkpoint.
  log "SIGTERM: the job is being cancelled, preempted or has reached its time limit; waiting for the step to end"
}
trap on_usr1 USR1
trap on_term TERM

log "job $SLURM_JOB_ID ($JOB_NAME), restart $RESTARTS (MAX_REQUEUES=$MAX_REQUEUES), $SLURM_NNODES node(s): ${HOSTS[*]}"
log "rendezvous $RDZV_HOST:$RDZV_PORT, $NPROC_PER_NODE processes per node, run dir $EFFECTIVE_RUN_DIR"
[[ -n ${WANDB_API_KEY:-} ]] || log "WANDB_API_KEY is not set (export it before sbatch, or WANDB_MODE=offline)"
for name in "${ENV_NAMES[@]}"; do log "$name=${!name}"; done
rm -f "$MARKER" "$FAILED"   # left by an earlier job: must not requeue this one, nor name its failure
log "launch: $(quote_cmd "${SRUN[@]}")"

"${SRUN[@]}" &
SRUN_PID=$!
wait_for "$SRUN_PID"
RC=$?
log "step ended with exit status $RC"

# What the step left: the marker (read, then removed whatever is decided below) and the failure reason.
HAVE_MARKER=0
STOP_NOTE=""
if [[ -e $MARKER ]]; then
  HAVE_MARKER=1
  STOP_NOTE=$(head -n 1 -- "$MARKER" 2>/dev/null)   # e.g. "stopped at step 1200 of 400000 on SIGUSR1"
  rm -f -- "$MARKER"
fi
FAIL_NOTE=""
if [[ -s $FAILED ]]; then FAIL_NOTE=$(head -n 1 -- "$FAILED" 2>/dev/null); fi

if (( GOT_TERM )); then
  log "cancelled/preempted (SIGTERM): not requeueing (a cancelled job stays cancelled; SLURM requeues a preemption itself)"
  if (( HAVE_MARKER )); then log "the workers stopped cleanly: ${STOP_NOTE:-(empty marker)}"; fi
  if (( GOT_USR1 )); then
    log "the SIGTERM came after the time-limit warning: if it was the time limit, stopping took longer than the" \
        "warning gives; raise the 120 in --signal=B:USR1@120 and resubmit (it resumes from the latest whole checkpoint)"
  fi
  exit "$RC"
fi

if (( RC != 0 )); then
  log "a rank failed (exit $RC): not requeueing"
  if [[ -n $FAIL_NOTE ]]; then log "reason ($FAILED): $FAIL_NOTE"; else log "the first error in the log above says why"; fi
  if (( GOT_USR1 )); then
    log "the failure came after the time-limit warning (SIGUSR1): the workers did not stop cleanly, so this is a" \
        "failure, not a stop to requeue"
  fi
  if (( HAVE_MARKER )); then log "the PREEMPTED marker (${STOP_NOTE:-empty}) was removed: a failed step never requeues"; fi
  exit "$RC"
fi

if (( !HAVE_MARKER )); then
  if (( GOT_USR1 )); then
    log "the run finished (its last step came before the time-limit warning could stop it): not requeueing"
  else
    log "the run finished: not requeueing"
  fi
  exit 0
fi

if [[ $STOP_NOTE == *SIGTERM* ]]; then
  # Only a SIGTERM to the step, not to this shell, gets here: e.g. `scancel --signal=TERM <jobid>`.
  log "cancelled/preempted (SIGTERM): not requeueing (the workers stopped on a SIGTERM sent to the step: $STOP_NOTE)"
  exit 0
fi
if (( GOT_USR1 )); then WHY="stopped for the time limit"; else WHY="stopped on a USR1 sent to the step"; fi
if (( RESTARTS >= MAX_REQUEUES )); then
  log "requeue limit reached: $WHY, but job $SLURM_JOB_ID has been requeued $RESTARTS times (MAX_REQUEUES=$MAX_REQUEUES)." \
      "To go on from the latest whole checkpoint, submit it again: sbatch --job-name=$JOB_NAME runjob_SLURM.sh" \
      "(same arguments); to allow more requeues, export MAX_REQUEUES=<n> before sbatch"
  exit 1
fi
log "$WHY: requeueing job $SLURM_JOB_ID (requeue $(( RESTARTS + 1 )) of at most $MAX_REQUEUES;" \
    "${STOP_NOTE:-empty marker}); it resumes from the latest whole checkpoint"
if "${REQUEUE[@]}"; then
  exit 0
fi
log "'${REQUEUE[*]}' failed; resubmit by hand: sbatch --job-name=$JOB_NAME runjob_SLURM.sh (same arguments)"
exit 1
