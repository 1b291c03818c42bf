"""bench.vs_release's reading of a release's recipe: its yaml files merged in the order the main
file names them, the optimizer both sides then use, and one clear line for a missing checkout.
(The release itself needs CUDA: it runs only on the GPU machine.)"""

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
