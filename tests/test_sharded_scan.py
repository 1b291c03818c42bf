"""The fused selective scan under a mesh: each device scans only its own shard (``shard_map``),
and the sharded step equals the single-device one. Runs in a subprocess with 8 CPU devices and
the Pallas backend in interpret mode."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from vidssm_jax import masking
    from vidssm_jax.models import create_model
    from vidssm_jax.train.sharding import (batch_sharding, make_mesh, tree_shardings,
                                           under_mesh)

    assert jax.device_count() == 8

    def pallas_calls_outside_shard_map(jaxpr, inside=False):
        """Counts (inside, outside) pallas_call equations of a closed jaxpr, recursively."""
        counts = [0, 0]
        def walk(j, inside):
            for eqn in j.eqns:
                name = eqn.primitive.name
                if name == "pallas_call":
                    counts[0 if inside else 1] += 1
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    walk(sub, inside or name == "shard_map")
        walk(jaxpr.jaxpr, False)
        return counts

    def check(name, model, method, video, extra, mesh_cfg):
        init = jax.jit(lambda: model.init(jax.random.key(0), video, *extra,
                                          method=method))
        boxed = init()
        params = nn.meta.unbox(boxed)["params"]
        loss = lambda p, v: model.apply({"params": p}, v, *extra, method=method)[0]
        value_and_grad = jax.value_and_grad(loss)
        fast = {"xla_backend_optimization_level": 0}
        ref_loss, ref_grads = jax.jit(value_and_grad).lower(params, video).compile(fast)(
            params, video)
        mesh = make_mesh(mesh_cfg)
        shardings = tree_shardings(jax.eval_shape(init)["params"], mesh)
        p = jax.device_put(params, shardings)
        v = jax.device_put(video, batch_sharding(mesh))
        sharded = jax.jit(under_mesh(value_and_grad, mesh),
                          in_shardings=(shardings, batch_sharding(mesh))).lower(p, v).compile(fast)
        got_loss, got_grads = sharded(p, v)
        # Each leaf against its own scale, floored at 1/1000 of the largest gradient: a leaf near
        # zero by cancellation (EndoMamba's A_log here is 4e-12, its patch embedding's 6e-6,
        # beside 0.25) only shows the float32 rounding of another summation order.
        scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_grads))
        err = max(float(jnp.max(jnp.abs(a - b))) / max(float(jnp.max(jnp.abs(b))), 1e-3 * scale)
                  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)))
        inside, outside = pallas_calls_outside_shard_map(
            jax.make_jaxpr(under_mesh(value_and_grad, mesh))(params, video))
        print(f"{name} mesh={dict(mesh.shape)} loss {float(ref_loss):.6f} vs "
              f"{float(got_loss):.6f} grad_err {err:.2e} pallas_calls inside/outside "
              f"shard_map {inside}/{outside}")
        assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert err <= 1e-4, err
        assert inside > 0 and outside == 0, (inside, outside)

    # The scan each device runs (what the fused kernels' native length is chosen for).
    from vidssm_jax.nn.mamba import local_scan_shape
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert local_scan_shape(8, 64) == (8, 64)  # no mesh
    assert under_mesh(lambda: local_scan_shape(8, 64), mesh)() == (2, 32)
    # 2 rows over data × fsdp = 4 and 63 channels over 2: not split, as sharded_selective_scan
    assert under_mesh(lambda: local_scan_shape(2, 63), mesh)() == (2, 63)

    # No enclosure (short sequences: the kernel runs in interpret mode); the sharding does not
    # depend on it.
    evim = create_model("evim3_tiny", img_size=16, num_frames=4, patch=4, tubelet=2, dim=16,
                        depth=1, decoder_depth=1, decoder_dim=16, d_state=4, mask_ratio=0.5,
                        time_chain=2, space_chain=2, use_egt=False, pool="mean",
                        scan_backend="pallas")
    video = jax.random.normal(jax.random.key(1), (8, 4, 16, 16, 1))
    mask = masking.batched_mask(jax.random.key(2), 8, evim.token_grid, 0.5, kind="stc",
                                time_chain=2, space_chain=2)
    check("evim3", evim, "pretrain_loss", video, (mask,), dict(data=2, fsdp=2, tensor=2))

    endo = create_model("endomamba_tiny", img_size=16, patch_size=8, dim=16, depth=2,
                        scan_backend="pallas")
    mean_sq = lambda mod, v: (jnp.mean(mod(v).astype(jnp.float32) ** 2), None)
    clip = jax.random.normal(jax.random.key(3), (8, 3, 16, 16, 3))
    check("endomamba", endo, mean_sq, clip, (), dict(data=4, fsdp=2, tensor=1))
    # Channels sharded: the bidirectional blocks run their two directions one after the other
    # (the fused two-group scan needs every channel of both on one device).
    check("endomamba", endo, mean_sq, clip, (), dict(data=2, fsdp=2, tensor=2))
    print("OK")
''')


def test_fused_scan_runs_on_local_shards_and_matches_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert proc.stdout.strip().endswith("OK")
  assert proc.stdout.count("inside/outside shard_map") == 3
