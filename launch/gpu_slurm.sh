#!/usr/bin/env bash
# Runs vidssm_jax.main on NODES GPU hosts under SLURM, one process per GPU (default) or one per
# host, with `srun` (blocking; inside or outside an allocation) or submitted with `sbatch`.
#
#   NODES=2 GPUS_PER_NODE=8 bash launch/gpu_slurm.sh [--dry-run] [--sbatch] [--per-host] -- \
#       --config=configs/endomamba.py --workdir=/shared/runs/endomamba
#
# Settings (environment):
#   NODES, GPUS_PER_NODE   required
#   PARTITION, ACCOUNT     passed to SLURM when set
#   TIME                   time limit, default 24:00:00
#   CPUS_PER_GPU           default 8 (data-loading workers live here)
#   PYTHON                 the interpreter on the hosts, default python3 (activate the venv first)
#   MEM_FRACTION           XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.9
# Flags: --dry-run prints every command and runs none; --sbatch submits instead of running;
# --per-host starts one process per host owning all its GPUs. Everything after `--` goes to
# vidssm_jax.main unchanged. `--multihost` makes every process call jax.distributed.initialize(),
# which reads the SLURM_* variables (coordinator, process count and id). SLURM sends SIGUSR1 five
# minutes before the time limit; the trainer then saves a checkpoint and exits, and the same
# command resumes. Put --workdir and data.dir on a file system every host sees.
set -euo pipefail

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
fail() { echo "gpu_slurm.sh: $*" >&2; exit 2; }

DRY_RUN=0 SUBMIT=0 PER_HOST=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --sbatch) SUBMIT=1 ;;
    --per-host) PER_HOST=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) fail "unknown option $1 (the trainer's flags go after --; see --help)" ;;
  esac
  shift
done
MAIN_ARGS=("$@")

positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
[[ -n ${NODES:-} ]] || fail "set NODES (the number of GPU hosts, e.g. NODES=2)"
positive "$NODES" || fail "NODES=$NODES is not a positive integer"
[[ -n ${GPUS_PER_NODE:-} ]] || fail "set GPUS_PER_NODE (e.g. GPUS_PER_NODE=8)"
positive "$GPUS_PER_NODE" || fail "GPUS_PER_NODE=$GPUS_PER_NODE is not a positive integer"
CPUS_PER_GPU=${CPUS_PER_GPU:-8}
positive "$CPUS_PER_GPU" || fail "CPUS_PER_GPU=$CPUS_PER_GPU is not a positive integer"
[[ ${#MAIN_ARGS[@]} -gt 0 ]] || fail "no trainer arguments: add -- --config=... --workdir=..."
if [[ $DRY_RUN == 0 ]]; then
  launcher=srun
  [[ $SUBMIT == 1 ]] && launcher=sbatch
  command -v "$launcher" >/dev/null || fail "$launcher not found: run this on a SLURM login node"
fi

quote() {  # one word for a POSIX shell, quoted only when it needs it
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {
  local out="" w
  for w in "$@"; do out+="$(quote "$w") "; done
  printf '%s\n' "${out% }"
}
run() { show "$@"; [[ $DRY_RUN == 1 ]] || exec "$@"; }

ENV=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}")
if [[ $PER_HOST == 1 ]]; then
  tasks=1 cpus=$((CPUS_PER_GPU * GPUS_PER_NODE))
  # SLURM gives every task SLURM_LOCALID 0, from which JAX would take one GPU per process.
  ENV+=("VIDSSM_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))")
else
  tasks=$GPUS_PER_NODE cpus=$CPUS_PER_GPU
fi
ALLOC=(--job-name="${JOB_NAME:-vidssm_jax}" --nodes="$NODES" --ntasks-per-node="$tasks"
       --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$cpus" --time="${TIME:-24:00:00}"
       --signal=USR1@300)
[[ -n ${PARTITION:-} ]] && ALLOC+=(--partition="$PARTITION")
[[ -n ${ACCOUNT:-} ]] && ALLOC+=(--account="$ACCOUNT")
TRAIN=("${PYTHON:-python3}" -m vidssm_jax.main --multihost "${MAIN_ARGS[@]}")

if [[ $SUBMIT == 1 ]]; then
  step="srun --kill-on-bad-exit=1"
  for w in "${TRAIN[@]}"; do step+=" $(quote "$w")"; done
  run "${ENV[@]}" sbatch "${ALLOC[@]}" --output="${JOB_NAME:-vidssm_jax}-%j.out" --wrap "$step"
else
  run "${ENV[@]}" srun "${ALLOC[@]}" --kill-on-bad-exit=1 "${TRAIN[@]}"
fi
