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

Given the EndoMamba release's checkout instead of a tarball, the same command builds that
release's own forks of both extensions from its ``videomamba/`` folder (``build_fork``, below:
neither upstream build can serve it), into ``BUILD_DIR/<extension>/ext``:

    python -m vidssm_jax.bench.mamba_ssm_build .whl/releases/EndoMamba build/peers/endomamba
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
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
  if not os.path.exists(sdist):
    raise FileNotFoundError(f"{package} source distribution {sdist!r} not found; run "
                            "`bash launch/gpu_wheels.sh --mamba-ssm` and carry .whl")
  os.makedirs(build_dir, exist_ok=True)
  with tarfile.open(sdist) as tar:
    tar.extractall(build_dir, filter="data")
  root = _source_root(build_dir, package)
  return _compile_sources(name, os.path.join(root, csrc), sources,
                          os.path.join(build_dir, "ext"), jobs)


def _compile_sources(name: str, csrc_dir: str, sources: list, out: str, jobs: int) -> str:
  """Compiles extension ``name`` from ``sources`` in ``csrc_dir`` into ``out``, for the local GPU's
  architecture alone, and imports it."""
  import torch
  from torch.utils import cpp_extension

  major, minor = torch.cuda.get_device_capability()
  os.environ["MAX_JOBS"] = str(jobs)
  os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
  os.makedirs(out, exist_ok=True)
  start = time.time()
  cpp_extension.load(
      name=name, sources=[os.path.join(csrc_dir, s) for s in sources],
      extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=_nvcc_flags(f"{major}{minor}"),
      extra_include_paths=[csrc_dir], build_directory=out,
      verbose=bool(os.environ.get("VIDSSM_BUILD_VERBOSE")))
  print(f"built {name} for sm_{major}{minor} in {time.time() - start:.0f} s ({out})", flush=True)
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


# ---- the EndoMamba release's own forks --------------------------------------------------------
#
# The release vendors both kernels under videomamba/ and calls them with its own arguments:
#   _mamba/csrc/selective_scan  mamba_ssm 2.2.0-2.2.2's sources (its Python says 1.0.1) with an
#       initial state for the forward scan: selective_scan_cuda.fwd takes a tenth argument, the
#       (batch, dim, n_chunks, 2·dstate) running-prefix buffer whose chunk-0 pairs (1, h0) the
#       kernel starts from (upstream takes nine and starts every scan at (1, 0)). Its streaming
#       path (mamba_inner_fn(..., ssm_state=, return_last_state=True)) depends on it.
#   causal-conv1d/csrc          causal_conv1d 1.0.0's sources, unchanged: causal_conv1d_fwd(x,
#       weight, bias, silu), the four-argument API that 1.1+ changed.
# So neither mamba_ssm 2.3.2's build nor causal_conv1d 1.5.0.post8's (above) can serve it. The
# sources are copied out of the checkout and given only the edits upstream itself made in later
# tags for CUDA 13 and newer torch (FORK_PATCHES), then compiled with the flags above.

FORKS = {
    # extension: (its csrc folder under videomamba/, its sources)
    "selective_scan_cuda": (os.path.join("_mamba", "csrc", "selective_scan"), _SOURCES),
    "causal_conv1d_cuda": (os.path.join("causal-conv1d", "csrc"), _CONV_SOURCES),
}
_NO_CUDA_CONTEXT = ("#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAStream.h>")


def _static(decl: str) -> tuple:
  return (f"    constexpr {decl}", f"    static constexpr {decl}")


FORK_PATCHES = {
    # extension: {file: ((old, new), ...)}; every `old` must occur, all its occurrences change.
    "selective_scan_cuda": {
        # mamba_ssm d49d7c9 (2.2.6, "support CUDA 13"): CCCL 3 dropped these cub helpers.
        "reverse_scan.cuh": (("cub::CTA_SYNC()", "__syncthreads()"),
                             ("cub::LaneId()", "(threadIdx.x & 0x1f)")),
        # mamba_ssm b29375c (2.2.3): no ATen/cuda/CUDAContext.h (it pulls in cusparse.h).
        "selective_scan.cpp": (_NO_CUDA_CONTEXT, ("(char)u.get_device()", "u.device()")),
    },
    "causal_conv1d_cuda": {
        # causal_conv1d 1f502d4 (1.5.0.post4): the same include and device guard.
        "causal_conv1d.cpp": (_NO_CUDA_CONTEXT, ("(char)x.get_device()", "x.device()")),
        # causal_conv1d ef3efba (1.0.1, "fix some build issues"): kernel constants the dispatch
        # lambdas use become static (here every local copy of the two, not only the first).
        "causal_conv1d_fwd.cu": (_static("bool kIsVecLoad"),),
        "causal_conv1d_bwd.cu": (_static("int kNElts"), _static("bool kIsVecLoad")),
    },
}


def fork_root(release_dir: str) -> str:
  """The release's ``videomamba/`` folder; a clear error if ``release_dir`` is not its checkout."""
  root = os.path.join(release_dir, "videomamba")
  if not os.path.isdir(os.path.join(root, "_mamba", "csrc")):
    raise FileNotFoundError(f"{release_dir!r} is not the EndoMamba release checkout (no "
                            "videomamba/_mamba/csrc); run `bash launch/gpu_wheels.sh --releases` "
                            "and carry .whl")
  return root


def prepare_fork_sources(release_dir: str, name: str, out: str) -> str:
  """Copies extension ``name``'s sources out of the release checkout into ``out`` and applies
  ``FORK_PATCHES``; returns ``out``. Raises if a patched line is not in the release's file."""
  csrc, _ = FORKS[name]
  src = os.path.join(fork_root(release_dir), csrc)
  if os.path.isdir(out):
    shutil.rmtree(out)
  shutil.copytree(src, out)
  for file, edits in FORK_PATCHES[name].items():
    path = os.path.join(out, file)
    with open(path) as f:
      text = f.read()
    for old, new in edits:
      if old not in text:
        raise ValueError(f"{name}: {old!r} not in {os.path.join(src, file)}; the release's "
                         "sources changed, FORK_PATCHES needs a look")
      text = text.replace(old, new)
    with open(path, "w") as f:
      f.write(text)
  return out


def build_fork(release_dir: str, build_dir: str, jobs: int = 16) -> list:
  """Builds the EndoMamba release's ``selective_scan_cuda`` and ``causal_conv1d_cuda`` from its
  checkout into ``build_dir/<name>/ext`` (each only when its ``.so`` is not there yet) and returns
  the two ``ext`` folders, for ``sys.path``."""
  out = []
  for name, (_, sources) in FORKS.items():
    ext = os.path.join(build_dir, name, "ext")
    if not glob.glob(os.path.join(ext, f"{name}*.so")):
      src = prepare_fork_sources(release_dir, name, os.path.join(build_dir, name, "src"))
      _compile_sources(name, src, sources, ext, jobs)
    out.append(ext)
  return out


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m vidssm_jax.bench.mamba_ssm_build SOURCE BUILD_DIR (SOURCE: "
             "mamba_ssm-*.tar.gz, causal_conv1d-*.tar.gz or the EndoMamba release checkout)")
  if os.path.isdir(sys.argv[1]):
    print(build_fork(sys.argv[1], sys.argv[2]))
  elif os.path.basename(sys.argv[1]).startswith("causal_conv1d"):
    build_causal_conv1d(sys.argv[1], sys.argv[2])
  else:
    build(sys.argv[1], sys.argv[2])
