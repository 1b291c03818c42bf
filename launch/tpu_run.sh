#!/usr/bin/env bash
# Runs vidssm_jax.main on every worker of a TPU VM slice.
# Usage: tpu_run.sh NAME ZONE -- --config=configs/evim3.py --workdir=gs://... [more flags]
set -euo pipefail
[ $# -ge 3 ] && [ "$3" = "--" ] || { echo "usage: $0 NAME ZONE -- MAIN_ARGS..." >&2; exit 2; }
NAME=$1 ZONE=$2; shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
ARGS=$(printf '%q ' "$@")
# Copy the working tree (not .git, not local venvs) to every worker.
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=.whl -czf /tmp/vidssm_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/vidssm_jax.tgz "$NAME":~/ --worker=all --zone="$ZONE"
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/vidssm_jax && tar -C ~/vidssm_jax -xzf ~/vidssm_jax.tgz && cd ~/vidssm_jax
  if [ ! -d ~/venv ]; then
    python3 -m venv ~/venv
    ~/venv/bin/pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    ~/venv/bin/pip install -q -e '.[video]'
  fi
  ~/venv/bin/python -m vidssm_jax.main $ARGS --multihost
"
