"""bench.train_step's rows are real training steps: the fine-tuning row learns its EF target."""
import jax.numpy as jnp
import numpy as np

from vidssm_jax.bench import train_step


def test_fine_tuning_row_regresses_ef_and_its_loss_falls():
  s = train_step.build_step("evim3_p4+ef", "full", small=True, dtype=jnp.float32,
                            scan_backend="auto")
  assert s["video"].shape[0] == 2 and s["compiled"] is not None
  losses = [float(s["run"](s["video"])) for _ in range(6)]
  assert np.all(np.isfinite(losses))
  assert losses[0] > 50.0  # targets are 10-80 (%), a fresh head predicts about 0
  assert losses[-1] < losses[0] and all(b <= a + 1e-3 for a, b in zip(losses, losses[1:]))
