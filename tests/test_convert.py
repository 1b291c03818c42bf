"""The converter's files and command line: a release-format checkpoint (.npz, .pth) of a tiny
E-ViM³ goes through ``python -m vidssm_jax.convert`` into a checkpoint ``load_params`` (and so
``--config.finetune.init_from``) reads back exactly; bad input is one line and exit status 2."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from vidssm_jax import convert
from vidssm_jax.convert.__main__ import main
from vidssm_jax.models import create_model


@pytest.fixture(scope="module")
def tiny_release():
  """Random params of evim3_tiny and the same weights in the release's names."""
  model = create_model("evim3_tiny")
  video = jax.ShapeDtypeStruct((1, 16, 32, 32, 1), np.float32)
  shapes = nn.meta.unbox(jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        shapes["params"])
  return params, convert.to_state_dict("evim3", params, model)


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_npz_through_the_command_line_and_back(tmp_path, tiny_release, capsys):
  params, state = tiny_release
  path = tmp_path / "release.npz"
  np.savez(path, **{f"module.{k}": v for k, v in state.items()})
  out = tmp_path / "ckpt"
  assert main(["--from", "evim3", "--input", str(path), "--preset", "evim3_tiny",
               "--output", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(":")[0] for l in lines] == ["convert"] * 5
  assert "parameters filled" in lines[3] and f"init_from={out}" in lines[4]
  assert (out / "latest" / "0").is_dir()
  assert_same_tree(convert.load_params(str(out)), params)


def test_pth_is_read_with_torch(tmp_path, tiny_release):
  torch = pytest.importorskip("torch")
  params, state = tiny_release
  path = tmp_path / "release.pth"
  # The release saves {"model": state_dict, "ema_container": ..., "epoch": ...}.
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 3}, path)
  read = convert.read_state_dict(str(path))
  assert set(read) == set(state) and all(read[k].dtype == np.float32 for k in read)
  assert_same_tree(convert.convert_state_dict("evim3", read, create_model("evim3_tiny")), params)


@pytest.mark.parametrize("name,content,message", [
    ("absent.npz", None, "no such file"),
    ("weights.ckpt", b"x", "unknown checkpoint format '.ckpt'"),
    ("broken.npz", b"not a zip", "not a readable .npz"),
])
def test_bad_files_are_one_line_and_exit_status_2(tmp_path, capsys, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  assert main(["--from", "evim3", "--input", str(path), "--preset", "evim3_tiny",
               "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err


def test_bad_preset_and_state_dict_exit_2(tmp_path, capsys, tiny_release):
  _, state = tiny_release
  path = tmp_path / "release.npz"
  np.savez(path, **{k: v for k, v in state.items() if "global_reg_token" not in k})
  args = ["--from", "evim3", "--input", str(path), "--output", str(tmp_path / "out")]
  assert main(args + ["--preset", "evim3_huge"]) == 2
  assert "unknown model 'evim3_huge'" in capsys.readouterr().err
  assert main(args + ["--preset", "evim3_tiny"]) == 2
  assert "1 missing keys: net.global_reg_token" in capsys.readouterr().err
  with pytest.raises(ValueError, match="no checkpoint"):
    convert.load_params(str(tmp_path))
