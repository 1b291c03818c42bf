#!/usr/bin/env bash
# Downloads the wheels the lent GPU machine lacks (it has jax, flax, optax, orbax, torch, triton,
# but no network and no grain / array_record / ml_collections / jax_triton) into .whl/ (git-ignored),
# for Python 3.12 on manylinux x86_64. A device run then installs them first:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# With --mamba-ssm it also fetches the mamba_ssm source distribution into .whl/src/, which
# vidssm_jax/bench/mamba_ssm_build.py compiles for sm_90 inside the run (never committed).
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
  "grain==0.2.18" "array-record==0.8.6" "ml-collections==1.1.0" "portpicker" "jax-triton==0.3.1"
if [[ "${1:-}" == "--mamba-ssm" ]]; then
  mkdir -p .whl/src
  # The sdist's address from the package index pip is configured with (PEP 691 JSON), without
  # building it: `pip download` would first build its metadata, which needs torch and CUDA.
  url=$(python3 - <<'PY'
import json, subprocess, sys, urllib.request
index = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                       capture_output=True, text=True).stdout.strip()
if not index:
  from pip._internal.models.index import PyPI
  index = PyPI.simple_url
req = urllib.request.Request(index.rstrip("/") + "/mamba-ssm/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req))["files"]
print(next(f["url"] for f in files if f["filename"] == "mamba_ssm-2.3.2.post1.tar.gz"))
PY
)
  curl -sSL -o .whl/src/mamba_ssm-2.3.2.post1.tar.gz "$url"
fi
ls -la .whl .whl/src 2>/dev/null
