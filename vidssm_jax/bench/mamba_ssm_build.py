"""Builds PyTorch ``mamba_ssm``'s selective-scan CUDA extension (and ``causal_conv1d``'s) from their
source distributions, for the peer column of ``python -m vidssm_jax.bench.scan`` and the releases
of ``python -m vidssm_jax.bench.vs_release`` (GPU machine only, never in CI).

The GPU machine has PyTorch, nvcc and ninja but no network and no mamba_ssm, so the sdist travels
with the run (``bash launch/gpu_wheels.sh --mamba-ssm`` puts it in the git-ignored ``.whl/src/``)
and this module compiles only ``selective_scan_cuda`` (the Mamba v1 kernels) for the local GPU's
architecture alone (sm_90 on an H100), with the compiler flags of mamba_ssm's own ``setup.py``:

    python -m vidssm_jax.bench.mamba_ssm_build .whl/src/mamba_ssm-2.3.2.post1.tar.gz /tmp/mamba_build

The same command given a ``causal_conv1d`` source tarball (``causal_conv1d-1.5.0.post8.tar.gz``,
the E-ViM3 release's kernel API: its sdist holds no CUDA sources, so ``launch/gpu_wheels.sh``
archives the tagged sources) builds ``causal_conv1d_cuda``; ``load_causal_conv1d(build_dir)``
then makes the ``causal_conv1d`` package importable, as the releases' Mamba blocks import it.

``load(build_dir)`` then imports ``selective_scan_fn`` from the built tree. It imports the
interface module directly rather than the ``mamba_ssm`` package, whose ``__init__`` pulls in the
Mamba-2/3 modules (tilelang, CuTe) that the scan does not need.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import tarfile
import time
import types

_SOURCES = [
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu", "selective_scan_fwd_fp16.cu", "selective_scan_fwd_bf16.cu",
    "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_fp32_complex.cu",
    "selective_scan_bwd_fp16_real.cu", "selective_scan_bwd_fp16_complex.cu",
    "selective_scan_bwd_bf16_real.cu", "selective_scan_bwd_bf16_complex.cu",
]


_CONV_SOURCES = ["causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu",
                 "causal_conv1d_update.cu"]


def _source_root(build_dir: str, package: str = "mamba_ssm") -> str:
  roots = sorted(glob.glob(os.path.join(build_dir, f"{package}-*")))
  roots = [r for r in roots if os.path.isdir(r)]
  if not roots:
    raise FileNotFoundError(f"no extracted {package}-* source tree in {build_dir}")
  return roots[-1]


def _nvcc_flags(arch: str) -> list:
  """mamba_ssm's and causal_conv1d's own setup.py flags, for the local architecture only."""
  return ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
          "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
          "--threads", "4", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _compile(name: str, sdist: str, build_dir: str, package: str, csrc: str, sources: list,
             jobs: int) -> str:
  """Extracts ``sdist`` into ``build_dir`` and compiles extension ``name`` into build_dir/ext."""
  import torch
  from torch.utils import cpp_extension

  if not os.path.exists(sdist):
    raise FileNotFoundError(f"{package} source distribution {sdist!r} not found; run "
                            "`bash launch/gpu_wheels.sh --mamba-ssm` and carry .whl")
  os.makedirs(build_dir, exist_ok=True)
  with tarfile.open(sdist) as tar:
    tar.extractall(build_dir, filter="data")
  root = _source_root(build_dir, package)
  major, minor = torch.cuda.get_device_capability()
  os.environ["MAX_JOBS"] = str(jobs)
  os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
  out = os.path.join(build_dir, "ext")
  os.makedirs(out, exist_ok=True)
  start = time.time()
  cpp_extension.load(
      name=name, sources=[os.path.join(root, csrc, s) for s in sources],
      extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=_nvcc_flags(f"{major}{minor}"),
      extra_include_paths=[os.path.join(root, csrc)], build_directory=out,
      verbose=bool(os.environ.get("VIDSSM_BUILD_VERBOSE")))
  print(f"built {name} for sm_{major}{minor} in {time.time() - start:.0f} s ({out})")
  return out


def build(sdist: str, build_dir: str, jobs: int = 16):
  """Extracts ``sdist`` into ``build_dir`` and compiles ``selective_scan_cuda`` there."""
  _compile("selective_scan_cuda", sdist, build_dir, "mamba_ssm",
           os.path.join("csrc", "selective_scan"), _SOURCES, jobs)
  return load(build_dir)


def build_causal_conv1d(sdist: str, build_dir: str, jobs: int = 16):
  """Extracts the ``causal_conv1d`` ``sdist`` into ``build_dir`` and compiles its extension."""
  _compile("causal_conv1d_cuda", sdist, build_dir, "causal_conv1d", "csrc", _CONV_SOURCES, jobs)
  return load_causal_conv1d(build_dir)


def load_causal_conv1d(build_dir: str):
  """The ``causal_conv1d`` package of a tree built by :func:`build_causal_conv1d`, importable."""
  root = _source_root(build_dir, "causal_conv1d")
  for path in (os.path.join(build_dir, "ext"), root):
    if path not in sys.path:
      sys.path.insert(0, path)
  import causal_conv1d
  return causal_conv1d


def load(build_dir: str):
  """``selective_scan_fn`` of mamba_ssm from a tree built by :func:`build`."""
  root = _source_root(build_dir)
  ext = os.path.join(build_dir, "ext")
  if ext not in sys.path:
    sys.path.insert(0, ext)
  import selective_scan_cuda  # noqa: F401  (the compiled extension)

  # A bare package object so the interface's `mamba_ssm.*` imports resolve inside the source tree
  # without running mamba_ssm/__init__.py.
  pkg = types.ModuleType("mamba_ssm")
  pkg.__path__ = [os.path.join(root, "mamba_ssm")]
  sys.modules.setdefault("mamba_ssm", pkg)
  path = os.path.join(root, "mamba_ssm", "ops", "selective_scan_interface.py")
  spec = importlib.util.spec_from_file_location("mamba_ssm.ops.selective_scan_interface", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module.selective_scan_fn


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m vidssm_jax.bench.mamba_ssm_build SDIST BUILD_DIR "
             "(SDIST: mamba_ssm-*.tar.gz or causal_conv1d-*.tar.gz)")
  if os.path.basename(sys.argv[1]).startswith("causal_conv1d"):
    build_causal_conv1d(sys.argv[1], sys.argv[2])
  else:
    build(sys.argv[1], sys.argv[2])
