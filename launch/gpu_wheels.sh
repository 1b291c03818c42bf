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
# inside the run (never committed).
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
if [[ "${1:-}" == "--mamba-ssm" ]]; then
  mkdir -p .whl/src
  # The sdist through pip itself. `pip download` prepares the package's metadata by running its
  # setup.py: MAMBA_SKIP_CUDA_BUILD skips the CUDA build there, and --no-build-isolation lets it
  # import the torch already installed here (pip install torch==2.13.0) instead of fetching one.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=FALSE python3 -m pip download -q --no-deps \
    --no-binary :all: --no-build-isolation -d .whl/src "mamba_ssm==2.3.2.post1"
fi
ls -la .whl .whl/src 2>/dev/null
