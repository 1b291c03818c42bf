#!/usr/bin/env bash
# One batched run of the GPU checks and benchmarks, for a single-GPU machine without network
# (the lent H100 of our workplace), writing logs under $OUT (default ./out):
#
#   bash launch/gpu_wheels.sh --mamba-ssm --releases  # once, on a machine with network
#   bash launch/device_bench.sh check sweep sweep_tp scan stream evim3 train_step vs_release profile
#
# Steps run in the order given; each logs to $OUT/<step>.log and a failure does not stop the
# others. The CUDA peers start building in the background at the beginning, side by side (each
# where its sources were carried): mamba_ssm and causal_conv1d from .whl/src/, EndoMamba's forks
# from .whl/releases/EndoMamba, into build/peers/, where bench.scan and bench.vs_release look
# (on an H100 all three were built about 170 s after the start, beside the model rows). "scan"
# waits for mamba_ssm, so its table has the CUDA peer column; "vs_release" waits for all three.
# The builds run at low priority: put the steps that time the host (stream) after the waits.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, triton, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'triton', triton.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"

MAMBA_BUILD=build/peers/mamba
build_pid="" peer_pids=()
build() {  # build SOURCE DIR LOG: one peer, in the background, at low priority
  nice -n 19 python3 -m vidssm_jax.bench.mamba_ssm_build "$1" "$2" >"$OUT/$3" 2>&1 &
}
sdist=$(ls .whl/src/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
if [[ -n "$sdist" ]]; then
  build "$sdist" "$MAMBA_BUILD" mamba_build.log
  build_pid=$!
  peer_pids+=("$build_pid")
fi
conv=$(ls .whl/src/causal_conv1d-*.tar.gz 2>/dev/null | head -1)
[[ -n "$conv" ]] && { build "$conv" build/peers/causal_conv1d conv_build.log; peer_pids+=($!); }
[[ -d .whl/releases/EndoMamba ]] && {
  build .whl/releases/EndoMamba build/peers/endomamba endomamba_build.log; peer_pids+=($!); }

run() {  # run NAME CMD...: logs to $OUT/NAME.log, prints its tail
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "${STEP_TIMEOUT:-420}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name: rc=$rc, $((SECONDS - start)) s"
  return $rc
}

# The models use backend "auto" (the fused kernel on GPU); if the GPU check of the kernels
# failed in this run, the model benchmarks fall back to the associative backend.
model_backend=auto

for step in "$@"; do
  case $step in
    check) run check python3 -m vidssm_jax.bench.scan --check || model_backend=associative ;;
    sweep) run sweep python3 -m vidssm_jax.bench.scan --sweep ;;
    sweep_tp) run sweep_tp python3 -m vidssm_jax.bench.scan --sweep-time-parallel ;;
    scan)
      if [[ -n "$build_pid" ]]; then
        wait "$build_pid"; echo "mamba_ssm build rc=$?"; tail -n 3 "$OUT/mamba_build.log"
        export VIDSSM_MAMBA_BUILD=$MAMBA_BUILD
      fi
      run scan python3 -m vidssm_jax.bench.scan ;;
    scan_assoc) run scan_assoc python3 -m vidssm_jax.bench.scan ;;
    stream) run stream python3 -m vidssm_jax.bench.stream --scan-backend $model_backend ;;
    evim3) run evim3 python3 -m vidssm_jax.bench.evim3 --scan-backend $model_backend ;;
    train_step) run train_step python3 -m vidssm_jax.bench.train_step --scan-backend $model_backend ;;
    vs_release)
      # (a bare wait: "scan" may have reaped mamba_ssm's build already; each build logs its end)
      [[ ${#peer_pids[@]} -gt 0 ]] && { wait; tail -qn 1 "$OUT"/*build.log; }
      run vs_release python3 -m vidssm_jax.bench.vs_release --results "$OUT/vs_release.json" ;;
    profile)
      run profile python3 -m vidssm_jax.bench.profile --model evim3_p4+ef --remat full \
        --no-command-buffers
      run profile_stream python3 -m vidssm_jax.bench.profile --stream --steps 10 \
        --no-command-buffers ;;
    mamba_wait)
      [[ -n "$build_pid" ]] && { wait "$build_pid"; echo "mamba_ssm build rc=$?"; }
      tail -n 5 "$OUT/mamba_build.log"
      ls -la "$MAMBA_BUILD/ext" 2>/dev/null | grep -E "\.so$" ;;
    *) echo "unknown step $step" ;;
  esac
done
