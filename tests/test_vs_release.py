"""bench.vs_release's reading of a release's recipe: E-ViM3's yaml files merged in the order the
main file names them, EndoMamba's script defaults, the optimizer both sides then use, and one
clear line for a missing checkout; the EndoMamba fork's sources patched for the build and its
packages importable without their __init__; our side of the EndoMamba rows at a tiny size. (The
releases themselves need CUDA: they run only on the GPU machine.)"""

import importlib
import json
import sys
import types

import numpy as np
import pytest

from vidssm_jax.bench import vs_release


def write(tmp_path, name, text):
  (tmp_path / "configs").mkdir(exist_ok=True)
  (tmp_path / "configs" / name).write_text(text)


def test_release_config_merges_defaults_then_main_and_reads_the_recipe(tmp_path):
  write(tmp_path, "default_a.yaml", "env:\n  amp:\n    amp_mode: fp16\n    amp_enabled: true\n"
        "trainer:\n  max_grad_norm: 5.0\n  optimizer:\n    optimizer_choice: adamw\n"
        "    adamw_eps: 1.0e-8\n    lr_default: 1.0\n    wd_default: 0.0\n")
  write(tmp_path, "default_b.yaml", "trainer:\n  max_grad_norm: 0.5\n")
  write(tmp_path, "main.yaml", "config:\n  additional: [default_a, default_b]\n"
        "env:\n  amp:\n    amp_mode: bf16\nmodel:\n  mask_prob: 0.8\n"
        "trainer:\n  optimizer:\n    adamw_eps: 1.0e-15\n    lr_default: 1.0e-3\n"
        "    wd_default: 1.0e-1\n")
  cfg = vs_release.release_config(str(tmp_path), "main.yaml")
  assert cfg["env"]["amp"] == {"amp_mode": "bf16", "amp_enabled": True}  # nested keys survive
  assert vs_release.recipe(cfg) == dict(lr=1e-3, eps=1e-15, weight_decay=0.1, clip=0.5,
                                        amp="bf16", mask_ratio=0.8)


def test_recipe_refuses_an_optimizer_it_does_not_time(tmp_path):
  write(tmp_path, "main.yaml", "config:\n  additional: []\nenv:\n  amp:\n    amp_mode: bf16\n"
        "model: {}\ntrainer:\n  max_grad_norm: 1.0\n  optimizer:\n    optimizer_choice: sgd\n")
  with pytest.raises(ValueError, match="sgd"):
    vs_release.recipe(vs_release.release_config(str(tmp_path), "main.yaml"))


def test_missing_release_checkout_is_one_line_and_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    vs_release.main(["--evim3", str(tmp_path / "nowhere")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "not the E-ViM3 release checkout" in err and "gpu_wheels.sh --releases" in err


def test_table_rows_and_ratio():
  r = dict(ms=400.0, mem_gib=25.0, loss=1.0, what="torch")
  o = dict(ms=200.0, mem_gib=20.0, loss=1.0, what="jax")
  assert vs_release.ratio(o, r) == "0.50"
  line = vs_release.format_row("evim3_p4_pretrain", "ours", o, vs_release.ratio(o, r))
  assert "200.0" in line and "20.00" in line and "0.50" in line
  failed = dict(error="ImportError: selective_scan_cuda")
  assert vs_release.ratio(o, failed) == "-"
  assert "failed: ImportError" in vs_release.format_row("x", "release", failed)


# ---- EndoMamba rows ------------------------------------------------------------------------

SCRIPT = """import argparse, os
def get_args():
    parser = argparse.ArgumentParser('EndoMamba pre-training script', add_help=False)
    parser.add_argument('--batch_size', default=48, type=int)
    parser.add_argument('--model', default='pretrain_endomamba_small_patch16_224', type=str)
    parser.add_argument('--decoder_depth', default=4, type=int)
    parser.add_argument('--mask_type', default='{mask}', choices=['random', 'tube'])
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--drop_path', type=float, default=0.0)
    parser.add_argument('--normlize_target', default=True, type=bool)
    parser.add_argument('--opt', default='adamw', type=str)
    parser.add_argument('--opt_eps', default=1e-8, type=float)
    parser.add_argument('--opt_betas', default=None, type=float, nargs='+')
    parser.add_argument('--clip_grad', type=float, default=None)
    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--lr', type=float, default=1.5e-4)
    parser.add_argument('--output_dir', default=os.path.join('out', 'x'))
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume')
    return parser.parse_args()
"""


def write_script(root, mask="tube"):
  path = root.joinpath(*vs_release.ENDOMAMBA_SCRIPT)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(SCRIPT.format(mask=mask))
  return path


def test_endomamba_recipe_is_the_scripts_defaults(tmp_path):
  defaults = vs_release.script_defaults(str(write_script(tmp_path)))
  assert "output_dir" not in defaults and "no_auto_resume" not in defaults  # not literals
  assert defaults["opt_betas"] is None and defaults["batch_size"] == 48
  rec = vs_release.endomamba_recipe(str(tmp_path), 8)
  assert rec == dict(model="pretrain_endomamba_small_patch16_224", lr=pytest.approx(1.5e-4 / 32),
                     eps=1e-8, betas=(0.9, 0.999), weight_decay=0.05, clip=None,
                     mask_ratio=0.75, decoder_depth=4, drop_path=0.0)
  write_script(tmp_path, mask="random")
  with pytest.raises(ValueError, match="mask_type='random'"):
    vs_release.endomamba_recipe(str(tmp_path), 8)
  with pytest.raises(FileNotFoundError, match="--endomamba"):
    vs_release.endomamba_recipe(str(tmp_path / "nowhere"), 8)


def fake_fork(root):
  """The release's kernel folders with the lines FORK_PATCHES edits (and one it must keep)."""
  scan = root / "videomamba" / "_mamba" / "csrc" / "selective_scan"
  conv = root / "videomamba" / "causal-conv1d" / "csrc"
  scan.mkdir(parents=True)
  conv.mkdir(parents=True)
  (scan / "reverse_scan.cuh").write_text("lane_id(cub::LaneId())\ncub::CTA_SYNC();\n")
  (scan / "selective_scan.cpp").write_text(
      "#include <ATen/cuda/CUDAContext.h>\nCUDAGuard device_guard{(char)u.get_device()};\n")
  (scan / "selective_scan_fwd_kernel.cuh").write_text("running_prefix = x[state_idx];\n")
  (conv / "causal_conv1d.cpp").write_text(
      "#include <ATen/cuda/CUDAContext.h>\nCUDAGuard device_guard{(char)x.get_device()};\n")
  (conv / "causal_conv1d_fwd.cu").write_text("    constexpr bool kIsVecLoad = K::kIsVecLoad;\n")
  (conv / "causal_conv1d_bwd.cu").write_text(
      "    constexpr int kNElts = K::kNElts;\n    constexpr bool kIsVecLoad = K::kIsVecLoad;\n")
  return scan, conv


def test_fork_sources_get_upstreams_later_build_fixes_only(tmp_path):
  from vidssm_jax.bench import mamba_ssm_build as mb

  scan, _ = fake_fork(tmp_path)
  out = mb.prepare_fork_sources(str(tmp_path), "selective_scan_cuda", str(tmp_path / "s"))
  assert (tmp_path / "s" / "reverse_scan.cuh").read_text() == (
      "lane_id((threadIdx.x & 0x1f))\n__syncthreads();\n")
  cpp = (tmp_path / "s" / "selective_scan.cpp").read_text()
  assert "c10/cuda/CUDAStream.h" in cpp and "{u.device()}" in cpp and "ATen" not in cpp
  # The fork's own change, the scan's initial state, is left as the release wrote it.
  assert (tmp_path / "s" / "selective_scan_fwd_kernel.cuh").read_text() == (
      "running_prefix = x[state_idx];\n")
  assert out == str(tmp_path / "s")
  mb.prepare_fork_sources(str(tmp_path), "causal_conv1d_cuda", str(tmp_path / "c"))
  assert (tmp_path / "c" / "causal_conv1d_bwd.cu").read_text() == (
      "    static constexpr int kNElts = K::kNElts;\n"
      "    static constexpr bool kIsVecLoad = K::kIsVecLoad;\n")
  (scan / "reverse_scan.cuh").write_text("__syncthreads();\n")  # a release that changed
  with pytest.raises(ValueError, match="reverse_scan.cuh"):
    mb.prepare_fork_sources(str(tmp_path), "selective_scan_cuda", str(tmp_path / "s"))
  with pytest.raises(FileNotFoundError, match="not the EndoMamba release checkout"):
    mb.prepare_fork_sources(str(tmp_path / "nowhere"), "selective_scan_cuda", str(tmp_path / "x"))


def test_release_packages_import_without_their_init(tmp_path, monkeypatch):
  """``_mamba.mamba_ssm`` without its __init__ (transformers 5 breaks it), ``ops`` at the
  fork's folder whatever else is called ``ops``."""
  where = vs_release.endomamba_import_paths(str(tmp_path))
  pkg = tmp_path / "videomamba" / "_mamba" / "mamba_ssm"
  (pkg / "modules").mkdir(parents=True)
  (pkg / "ops").mkdir()
  (pkg / "__init__.py").write_text("raise ImportError('the language-model imports')\n")
  (pkg / "modules" / "__init__.py").write_text("")
  (pkg / "modules" / "mixer.py").write_text("from ops.kernels import K\n")
  (pkg / "ops" / "kernels.py").write_text("K = 'fork'\n")
  assert where["packages"]["ops"] == str(pkg / "ops")
  assert where["path"][0] == str(tmp_path / "videomamba" / "video_sm")
  for name in ("_mamba", "_mamba.mamba_ssm", "_mamba.mamba_ssm.modules",
               "_mamba.mamba_ssm.modules.mixer", "ops", "ops.kernels"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  monkeypatch.setitem(sys.modules, "ops", types.ModuleType("ops"))  # someone else's `ops`
  for name, path in where["packages"].items():
    vs_release._bare_package(name, path)
  vs_release._bare_package("ops", where["packages"]["ops"])  # a second call keeps it
  mixer = importlib.import_module("_mamba.mamba_ssm.modules.mixer")
  assert mixer.K == "fork"
  for name in ("_mamba", "_mamba.mamba_ssm", "_mamba.mamba_ssm.modules",
               "_mamba.mamba_ssm.modules.mixer", "ops.kernels"):
    monkeypatch.delitem(sys.modules, name, raising=False)


TINY = dict(img_size=32, patch_size=16, dim=32, depth=2)
RECIPE = dict(model="pretrain_endomamba_small_patch16_224", lr=1e-4, eps=1e-8, betas=(0.9, 0.999),
              weight_decay=0.05, clip=None, mask_ratio=0.75, decoder_depth=1, drop_path=0.0)


def test_our_endomamba_rows_run_at_a_tiny_size():
  step = vs_release.ours_endomamba_pretrain(RECIPE, 2, batch=2, frames=2, decoder_depth=1,
                                            decoder_dim=32, decoder_heads=2, **TINY)
  assert {"ms", "mem_gib", "loss", "compile_s", "batch", "what"} <= set(step)
  assert np.isfinite(step["ms"]) and step["ms"] > 0 and step["batch"] == 2
  assert np.isfinite(step["loss"]) and step["loss"] > 0 and "no teacher" in step["what"]
  stream = vs_release.ours_endomamba_stream(3, 2, 3, **TINY)
  assert {"ms", "mem_gib", "feature_mean", "compile_s", "batch", "what"} <= set(stream)
  assert np.isfinite(stream["ms"]) and stream["ms"] > 0 and stream["batch"] == 3
  assert np.isfinite(stream["feature_mean"]) and stream["feature_mean"] > 0
  assert "T=2" in stream["what"]
  line = vs_release.format_row("endomamba_s_stream_b16", "ours", stream)
  assert f"{3 / (stream['ms'] * 1e-3):9.1f}" in line and "mean |feature|" in line


def test_stream_rows_count_frames_of_every_stream():
  r = dict(ms=4.0, mem_gib=1.5, batch=16, feature_mean=0.5, what="jax")
  line = vs_release.format_row("endomamba_s_stream_b16", "ours", r, "0.25")
  assert "4.00" in line and "4000.0" in line and "1.50" in line and "0.25" in line
  del r["batch"]  # a results file from before: the row's own batch
  assert "4000.0" in vs_release.format_row("endomamba_s_stream_b16", "ours", r)


def test_missing_endomamba_checkout_is_one_line_and_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:  # the E-ViM3 checkout is not needed for these rows
    vs_release.main(["--rows", "endomamba_s_stream_T16", "--endomamba", str(tmp_path / "no"),
                     "--evim3", str(tmp_path / "nowhere")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "not the EndoMamba release checkout" in err and "gpu_wheels.sh --releases" in err


def test_a_failing_child_reports_its_error_as_the_result(tmp_path, capsys):
  vs_release.main(["--child", "ours", "--row", "endomamba_s_pretrain",
                   "--endomamba", str(tmp_path / "nowhere")])
  line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(vs_release._MARK)]
  out = json.loads(line[-1][len(vs_release._MARK):])
  assert out["error"].startswith("FileNotFoundError") and "--endomamba" in out["error"]


def test_sides_run_in_subprocesses_and_failures_land_in_the_table(tmp_path, capsys):
  (tmp_path / "videomamba" / "_mamba").mkdir(parents=True)  # a checkout without its script
  results = tmp_path / "results.json"
  vs_release.main(["--rows", "endomamba_s_pretrain", "--endomamba", str(tmp_path),
                   "--sides", "ours", "--results", str(results), "--timeout", "120"])
  out = capsys.readouterr().out
  assert "endomamba_s_pretrain    ours     failed: FileNotFoundError" in out
  assert vs_release.HEADER in out and vs_release.LEGEND in out
  saved = json.loads(results.read_text())
  assert saved["endomamba_s_pretrain"]["ours"]["error"].startswith("FileNotFoundError")


def test_a_side_past_its_timeout_is_a_failed_row_not_a_crash(tmp_path, capsys):
  (tmp_path / "videomamba" / "_mamba").mkdir(parents=True)
  results = tmp_path / "results.json"
  # our full-size stream row on CPU: it is still importing and building when the second ends
  vs_release.main(["--rows", "endomamba_s_stream_T16", "--endomamba", str(tmp_path),
                   "--sides", "ours", "--results", str(results), "--timeout", "1"])
  assert "failed: timed out after 1 s" in capsys.readouterr().out
  saved = json.loads(results.read_text())
  assert saved["endomamba_s_stream_T16"]["ours"]["error"].startswith("timed out after 1 s")


def test_peers_build_once_before_the_rows_and_a_failed_build_is_one_line(tmp_path, capsys):
  args = vs_release._parser().parse_args(["--build", str(tmp_path / "build"),
                                          "--sdists", str(tmp_path / "no_sdists")])
  vs_release.build_peers(args, ["evim3_p4_pretrain"])
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("building the releases' CUDA extensions under")
  assert out[1].startswith("building failed (") and out[1].endswith("the release rows will say why")


def test_build_only_builds_and_runs_no_row(tmp_path, capsys):
  (tmp_path / "videomamba" / "_mamba").mkdir(parents=True)  # a checkout without the fork sources
  vs_release.main(["--build-only", "--rows", "endomamba_s_pretrain", "--endomamba", str(tmp_path),
                   "--build", str(tmp_path / "build")])
  out = capsys.readouterr().out
  assert out.startswith("building the releases' CUDA extensions under")
  assert "building failed (" in out and vs_release.HEADER not in out
