#!/usr/bin/env bash
# Downloads the wheels the lent GPU machine lacks (it has jax, flax, optax, orbax, torch, triton,
# but no network and no grain / array_record / ml_collections) into .whl/ (git-ignored),
# for Python 3.12 on manylinux x86_64. A device run then installs them first:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# With --mamba-ssm it also fetches the mamba_ssm source distribution into .whl/src/ (torch must be
# installed where this runs), which vidssm_jax/bench/mamba_ssm_build.py compiles for sm_90
# inside the run (never committed), and causal_conv1d's, which the releases' Mamba blocks import.
#
# With --releases it also puts the authors' PyTorch code, which `python -m vidssm_jax.bench.vs_release`
# runs against ours, in .whl/releases/ (git-ignored; their code never enters the repo), with the
# packages the E-ViM3 release needs that the GPU image lacks (ema_pytorch and its beartype, as
# wheels). The EndoMamba release needs no wheel (timm, einops, sympy and triton are in the image)
# and no sdist: its kernels are its own forks of selective_scan_cuda and causal_conv1d_cuda,
# compiled from its checkout by `python -m vidssm_jax.bench.mamba_ssm_build
# .whl/releases/EndoMamba build/peers/endomamba` (or inside vs_release's first EndoMamba row).
# Each release is cloned from GitHub, or exported from a local mirror when RELEASE_MIRROR names a
# directory holding OWNER+NAME/repo bare clones.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "grain==0.2.18" "array-record==0.8.6" "ml-collections==1.1.0" "portpicker"
if [[ " $* " == *" --mamba-ssm "* ]]; then
  mkdir -p .whl/src
  # The sdist through pip itself. `pip download` prepares the package's metadata by running its
  # setup.py: MAMBA_SKIP_CUDA_BUILD skips the CUDA build there, and --no-build-isolation lets it
  # import the torch already installed here (pip install torch==2.13.0) instead of fetching one.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=FALSE python3 -m pip download -q --no-deps \
    --no-binary :all: --no-build-isolation -d .whl/src "mamba_ssm==2.3.2.post1"
  # causal_conv1d 1.5.0.post8: the kernel API the E-ViM3 release calls (1.6 changed it). Its sdist
  # holds no CUDA sources, so the tagged sources are archived (from RELEASE_MIRROR, if set).
  conv="${RELEASE_MIRROR:-}/Dao-AILab+causal-conv1d/repo"
  if [[ -z "${RELEASE_MIRROR:-}" || ! -d "$conv" ]]; then
    rm -rf /tmp/causal-conv1d && git clone -q --bare https://github.com/Dao-AILab/causal-conv1d \
      /tmp/causal-conv1d && conv=/tmp/causal-conv1d
  fi
  git -C "$conv" archive --prefix=causal_conv1d-1.5.0.post8/ v1.5.0.post8 csrc causal_conv1d \
    | gzip > .whl/src/causal_conv1d-1.5.0.post8.tar.gz
fi
if [[ " $* " == *" --releases "* ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "ema-pytorch==0.4.5" beartype
  for repo in HenryZhou19/E-ViM3 TianCuteQY/EndoMamba; do
    dest=".whl/releases/${repo#*/}"
    rm -rf "$dest" && mkdir -p "$dest"
    mirror="${RELEASE_MIRROR:-}/${repo/\//+}/repo"
    if [[ -n "${RELEASE_MIRROR:-}" && -d "$mirror" ]]; then
      git -C "$mirror" archive HEAD | tar -x -C "$dest"
    else
      git clone -q --depth 1 "https://github.com/$repo" "$dest"
    fi
    rm -rf "$dest/.git"
    find "$dest" \( -name "*.png" -o -name "*.jpg" -o -name "*.gif" -o -name "*.pdf" \) -delete
  done
  du -sh .whl/releases/*
fi
ls -la .whl .whl/src 2>/dev/null
