#!/usr/bin/env bash
# Runs vidssm_jax.main on every worker of a Cloud TPU VM slice: creates the slice (or a queued
# resource) unless it exists, copies this working tree to all workers, installs the package into a
# venv there, then starts `python -m vidssm_jax.main --multihost ARGS` on all of them at once.
#
#   TPU_NAME=vidssm ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 \
#     bash launch/tpu_pod.sh [--dry-run] [--queued] [--spot] -- \
#       --config=configs/endomamba.py --workdir=gs://BUCKET/runs/endomamba
#
# Settings (environment; flags of the same meaning win):
#   TPU_NAME, ZONE, ACCELERATOR_TYPE   required (e.g. vidssm, us-east5-a, v5p-64)
#   TPU_VERSION     runtime image, default tpu-ubuntu2204-base (v5e/v6e: v2-alpha-tpuv5-lite, ...)
#   PROJECT         gcloud project (default: gcloud's configured one)
#   QUEUED=1        create through a queued resource (waits until it is ACTIVE)
#   SPOT=1          spot capacity
# Flags: --dry-run prints every command and runs none; --stop kills the trainers on all workers
# and frees the TPU instead of starting one; --delete deletes the slice. Everything after `--`
# goes to vidssm_jax.main unchanged. Put --workdir and data.dir on storage every worker sees
# (gs://); `--multihost` makes each worker call jax.distributed.initialize(), whose arguments
# the TPU runtime provides.
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
fail() { echo "tpu_pod.sh: $*" >&2; exit 2; }

DRY_RUN=0 QUEUED=${QUEUED:-0} SPOT=${SPOT:-0} ACTION=run
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --stop) ACTION=stop ;;
    --delete) ACTION=delete ;;
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) fail "unknown option $1 (the trainer's flags go after --; see --help)" ;;
  esac
  shift
done
MAIN_ARGS=("$@")

[[ -n ${TPU_NAME:-} ]] || fail "set TPU_NAME (the slice's name, e.g. TPU_NAME=vidssm)"
[[ -n ${ZONE:-} ]] || fail "set ZONE (e.g. ZONE=us-east5-a)"
if [[ $ACTION == run ]]; then
  [[ -n ${ACCELERATOR_TYPE:-} ]] || fail "set ACCELERATOR_TYPE (e.g. ACCELERATOR_TYPE=v5p-64)"
  [[ ${#MAIN_ARGS[@]} -gt 0 ]] || fail "no trainer arguments: add -- --config=... --workdir=..."
fi
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=/tmp/vidssm_jax-$TPU_NAME.tgz

# Quotes one word for a POSIX shell only when it needs it, so printed commands stay readable
# and can be pasted back.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {
  local out="" w
  for w in "$@"; do out+="$(quote "$w") "; done
  printf '%s\n' "${out% }"
}
run() { show "$@"; [[ $DRY_RUN == 1 ]] || "$@"; }

if [[ $DRY_RUN == 0 ]]; then
  command -v gcloud >/dev/null || fail "gcloud not found (install the Google Cloud CLI)"
fi
G=(gcloud compute tpus)
WHERE=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && WHERE+=(--project="$PROJECT")
ssh_all() { run "${G[@]}" tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"; }

if [[ $ACTION == stop ]]; then
  ssh_all "pkill -f \"python -m vidssm_jax.main\" || true; sudo rm -f /tmp/libtpu_lockfile"
  exit 0
fi
if [[ $ACTION == delete ]]; then
  if [[ $QUEUED == 1 ]]; then
    run "${G[@]}" queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
  else
    run "${G[@]}" tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
  fi
  exit 0
fi

# 1. The slice: reused when it exists.
SPOT_FLAG=()
[[ $SPOT == 1 ]] && SPOT_FLAG=(--spot)
if [[ $QUEUED == 1 ]]; then
  describe=("${G[@]}" queued-resources describe "$TPU_NAME" "${WHERE[@]}" --format='value(state.state)')
  create=("${G[@]}" queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${WHERE[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" "${SPOT_FLAG[@]}")
else
  describe=("${G[@]}" tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)')
  create=("${G[@]}" tpu-vm create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$VERSION" "${SPOT_FLAG[@]}")
fi
show "${describe[@]}"
state=""
[[ $DRY_RUN == 1 ]] || state=$("${describe[@]}" 2>/dev/null || true)
if [[ -n $state ]]; then
  echo "# $TPU_NAME exists ($state): reusing it" >&2
else
  [[ $DRY_RUN == 1 ]] && echo "# when the describe above finds nothing:"
  run "${create[@]}"
  if [[ $QUEUED == 1 ]]; then
    [[ $DRY_RUN == 1 ]] && echo "# then, every 30 s until it prints ACTIVE:"
    show "${describe[@]}"
    while [[ $DRY_RUN == 0 ]]; do
      state=$("${describe[@]}")
      [[ $state == ACTIVE ]] && break
      [[ $state == FAILED || $state == SUSPENDED ]] && fail "queued resource $TPU_NAME is $state"
      sleep 30
    done
  fi
fi

# 2. This working tree on every worker, installed into a venv (kept between runs).
run tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=.venv --exclude=.whl \
  --exclude=__pycache__ .
run "${G[@]}" tpu-vm scp "$TARBALL" "$TPU_NAME":vidssm_jax.tgz "${WHERE[@]}" --worker=all
ssh_all "set -e; rm -rf ~/vidssm_jax && mkdir -p ~/vidssm_jax && tar -xzf ~/vidssm_jax.tgz -C ~/vidssm_jax; [ -d ~/vidssm_venv ] || python3 -m venv ~/vidssm_venv; ~/vidssm_venv/bin/pip install -q -U pip; ~/vidssm_venv/bin/pip install -q \"jax[tpu]\" -e \"\$HOME/vidssm_jax[video]\""

# 3. The trainer on every worker at once.
args=""
for w in "${MAIN_ARGS[@]}"; do args+=" $(quote "$w")"; done
ssh_all "cd ~/vidssm_jax && ~/vidssm_venv/bin/python -m vidssm_jax.main --multihost$args"
