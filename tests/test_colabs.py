"""colabs/: every notebook is in sync with its jupytext py:percent twin, is stored without
outputs, and runs top to bottom in its smoke setting (VIDSSM_SMOKE=1), showing its pictures."""

import os
import pathlib
import time

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("finetune_echo_evim3", "finetune_polyp_endomamba", "stream_endomamba")
# Matplotlib figures each draws: loss curves, reconstructions and the EF scatter; loss/validation
# curves and the metric bars; the phase probabilities over time.
PLOTS = {"finetune_echo_evim3": 3, "finetune_polyp_endomamba": 2, "stream_endomamba": 1}


def test_every_notebook_is_listed_and_paired():
  assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)
  assert sorted(p.stem for p in COLABS.glob("*.py")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_and_py_are_in_sync(name):
  nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  py = jupytext.read(COLABS / f"{name}.py")
  assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  cells = lambda n: [(c.cell_type, c.source) for c in n.cells]
  assert cells(nb) == cells(py), (f"colabs/{name}.ipynb and .py differ: run "
                                   f"`jupytext --sync colabs/{name}.py`")
  for c in nb.cells:
    if c.cell_type == "code":
      assert not c.outputs and c.execution_count is None, f"{name}: strip the outputs"


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
  monkeypatch.setenv("VIDSSM_SMOKE", "1")
  monkeypatch.setenv("VIDSSM_SMOKE_DIR", str(tmp_path))
  nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  start = time.time()
  # Fails on the first cell that raises (nbclient.exceptions.CellExecutionError).
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  print(f"{name}: {time.time() - start:.0f} s")
  outputs = _outputs(nb)
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  videos = [o for o in outputs if "<img" in o.get("data", {}).get("text/html", "")]
  assert len(pngs) == PLOTS[name], f"{name}: expected its {PLOTS[name]} plots"
  assert videos, f"{name}: expected a mediapy video"
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "test/" in text   # the evaluation's metrics were printed
  assert (tmp_path / "run" / "metrics.json").exists()
