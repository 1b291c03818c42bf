#!/usr/bin/env bash
# Kills trainers left running on a TPU slice and frees the TPU (removes libtpu's lockfile).
# Usage: tpu_kill.sh NAME ZONE
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 NAME ZONE" >&2; exit 2; }
gcloud compute tpus tpu-vm ssh "$1" --zone="$2" --worker=all --command \
  "pkill -f vidssm_jax.main || true; sudo rm -f /tmp/libtpu_lockfile; sudo lsof -w /dev/accel* || true"
