#!/usr/bin/env bash
# Creates a TPU VM slice. Usage: tpu_create.sh NAME ZONE ACCELERATOR_TYPE [RUNTIME_VERSION]
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NAME ZONE ACCELERATOR_TYPE [RUNTIME_VERSION]" >&2; exit 2; }
NAME=$1 ZONE=$2 TYPE=$3 VERSION=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
  --version="$VERSION"
