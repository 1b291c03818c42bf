"""Where a training step's time goes: a JAX profiler trace of one model's step read as a per-op table.

    python -m vidssm_jax.bench.profile --model evim3_p4            # GPU: the train_step shapes
    python -m vidssm_jax.bench.profile --model evim3_p4 --small    # CPU smoke run, tiny model
    python -m vidssm_jax.bench.profile --stream                    # EndoMamba-S live frame, b=1

With ``--stream`` the traced program is one live frame of EndoMamba-S (``step`` at batch
``--batch``, 224², bf16, continuing from the state of the frames before, as ``bench.vs_release``
times it); its ops all count under the pass ``frame``.

The step is ``bench.train_step``'s (same shapes, dtype and remat policy). It is compiled, run
twice to warm up, then ``--steps`` times under ``jax.profiler.trace``. Every device op of the
trace (a GPU kernel, or on CPU an XLA thunk) is attributed to its HLO instruction, and through the
compiled program's metadata to the JAX operation and the Flax module that emitted it. The table
groups ops by

- ``pass``: ``fwd`` (forward), ``bwd`` (the transpose, i.e. backward), ``opt`` (the rest: the
  optimizer update, the mask draw);
- ``where``: the module path with the scanned layer index folded (``layers_3`` -> ``layers_*``)
  and the scan/while plumbing dropped, ending in the primitive (``mixer/in_proj/dot_general``);

and prints ms per step, share of the summed device time, and kernels per step, largest first,
then the totals per pass and per primitive. ``device busy`` is the summed op time against the
step's wall time (below 100%: launch gaps, or ops overlapping on streams). With ``--trace-dir``
the raw trace is kept for TensorBoard / Perfetto.

XLA's command buffers (CUDA graphs) can hide which instruction a GPU kernel belongs to; such
kernels count under their kernel name. ``--no-command-buffers`` (set before jax starts) turns
them off for a fully attributed trace at a slightly different step time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

_PASSES = (("transpose(jvp(", "bwd"), ("jvp(", "fwd"))
_PLUMBING = {"while", "body", "closed_call", "cond", "branch", "checkpoint", "remat",
             "rematted_computation", "pjit", "core_call", "forward",
             "eval_jaxpr"}
_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict:
  """``{instruction name: op_name}`` from a compiled HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def place(op_name: str, rest: str = "opt") -> tuple[str, str]:
  """``(pass, where)`` of an op_name such as
  ``jit(step)/transpose(jvp(EViM3.pretrain_loss))/.../blocks/layers_4/.../in_proj/dot_general``;
  ``rest`` names the pass of an op outside any jvp/transpose."""
  phase = rest
  for marker, name in _PASSES:
    if marker in op_name:
      phase = name
      break
  parts = []
  for part in op_name.split("/")[1:]:  # drop jit(step)
    if part.startswith(("jvp(", "transpose(", "vmap(", "jit(")) and part.endswith(")"):
      inner = re.sub(r"^(?:\w+\()+", "", part).rstrip(")")
      if part.startswith("jit(") and inner:
        parts.append(inner)  # a jitted helper (take_along_axis, silu): keep its name
      continue
    if part in _PLUMBING or part.startswith("checkpoint"):
      continue
    part = re.sub(r"layers_\d+", "layers_*", part)
    if parts and part.startswith(parts[-1] + "."):  # "layers_*" then "layers_*.forward"
      part = part[len(parts[-1]) + 1:]
    if part not in _PLUMBING:
      parts.append(part)
  return phase, "/".join(parts) or "(top)"


def _device_events(xplane_path: str):
  """``(hlo_op, kernel name, duration ns)`` of every device op in a trace."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(xplane_path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:  # CPU: XLA's thunks run on host threads
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  for plane in planes:
    for line in plane.lines:
      if line.name.startswith(("python", "XLA Modules", "Source", "Steps", "XLA TraceMe")):
        continue
      ops = []
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" in stats or plane.name.startswith("/device:"):
          ops.append((ev.start_ns, ev.duration_ns, str(stats.get("hlo_op", "")), ev.name))
      ops.sort()
      on_host = not plane.name.startswith("/device:")
      for i, (start, ns, hlo_op, kernel) in enumerate(ops):
        # On CPU a loop's thunk encloses its body's: count only the innermost ops. A GPU stream's
        # kernels do not nest, but on Hopper one launched with programmatic dependent launch may
        # start before its predecessor ends: every one counts.
        if on_host and i + 1 < len(ops) and ops[i + 1][0] < start + ns:
          continue
        yield hlo_op, kernel, ns


def profile_table(events, names: dict, steps: int, rest: str = "opt"):
  """``(rows, totals)``: rows ``(pass, where, ms per step, kernels per step)`` largest first,
  totals ``{"pass": {...}, "primitive": {...}}`` in ms per step; ``rest`` as ``place``'s."""
  time_ns = collections.Counter()
  count = collections.Counter()
  for hlo_op, kernel, ns in events:
    # GPU kernels may carry no instruction name; XLA names a fusion's kernel after it, "_"
    # for "." ("loop_add_fusion_16" is %loop_add_fusion.16).
    name = names.get(hlo_op) or names.get(kernel) or names.get(re.sub(r"_(\d+)$", r".\1", kernel))
    key = place(name, rest) if name is not None else ("?", f"(kernel) {kernel[:60]}")
    time_ns[key] += ns
    count[key] += 1
  rows = [(ph, where, ns / steps / 1e6, count[(ph, where)] / steps)
          for (ph, where), ns in time_ns.most_common()]
  totals = {"pass": collections.Counter(), "primitive": collections.Counter()}
  for ph, where, ms, _ in rows:
    totals["pass"][ph] += ms
    totals["primitive"][where.rsplit("/", 1)[-1]] += ms
  return rows, totals


def print_table(rows, totals, wall_ms: float, top: int) -> None:
  total = sum(r[2] for r in rows)
  kernels = sum(r[3] for r in rows)
  print(f"step wall {wall_ms:.2f} ms; summed device ops {total:.2f} ms in {kernels:.0f} ops "
        f"(device busy {100 * total / wall_ms:.0f}%)", flush=True)
  print(f"{'pass':<4} {'ms/step':>8} {'share':>6} {'ops/step':>8}  where")
  for ph, where, ms, n in rows[:top]:
    print(f"{ph:<4} {ms:8.3f} {100 * ms / total:5.1f}% {n:8.1f}  {where}")
  if len(rows) > top:
    rest = sum(r[2] for r in rows[top:])
    print(f"{'':<4} {rest:8.3f} {100 * rest / total:5.1f}% {'':>8}  ({len(rows) - top} more)")
  for title, table in (("pass", totals["pass"]), ("primitive", totals["primitive"])):
    print(f"\nby {title}:")
    for key, ms in table.most_common(12):
      print(f"  {key:<28} {ms:8.3f} ms {100 * ms / total:5.1f}%")


def build_stream(batch: int, small: bool, dtype, scan_backend: str) -> dict:
  """One live frame of EndoMamba-S as ``bench.vs_release`` times it: ``run(frame)`` continues
  the stream from the state the previous call returned (the warm-up calls are its history);
  also the ``frame`` and the ``compiled`` step. ``small``: a tiny model (CPU)."""
  from vidssm_jax.bench.stream import _init as init_variables
  from vidssm_jax.bench.stream import live_stream
  from vidssm_jax.models import create_model

  kw = dict(img_size=32, dim=32, depth=4) if small else {}
  model = create_model("endomamba_small", dtype=dtype, scan_backend=scan_backend, **kw)
  variables = init_variables(model, model.img_size)
  advance, frame, step = live_stream(model, variables, batch)
  # the same program again, for its instruction names (XLA names them deterministically)
  compiled = step.lower(frame, model.init_state(batch)).compile()
  return dict(run=lambda frame: advance()[0], video=frame, compiled=compiled)


def run_profile(model: str, remat: str, small: bool, steps: int, trace_dir: str | None,
                scan_backend: str, stream_batch: int = 0):
  """Build, warm up and trace ``steps`` steps (or, with ``stream_batch``, live frames of that
  many streams); returns ``(rows, totals, wall ms per step)``."""
  import jax
  import jax.numpy as jnp

  from vidssm_jax.bench import train_step

  dtype = jnp.float32 if small else jnp.bfloat16
  if stream_batch:
    s = build_stream(stream_batch, small, dtype, scan_backend)
  else:
    s = train_step.build_step(model, remat, small, dtype, scan_backend)
  run, video = s["run"], s["video"]
  for _ in range(2):
    jax.block_until_ready(run(video))
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="vidssm_profile_")
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(run(video))
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise RuntimeError(f"the profiler wrote no .xplane.pb under {trace_dir}")
  names = op_names(s["compiled"].as_text())
  rows, totals = profile_table(_device_events(paths[-1]), names, steps,
                               rest="frame" if stream_batch else "opt")
  return rows, totals, wall_ms


def main(argv=None):
  from vidssm_jax.bench.train_step import MODELS

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="evim3_p4", help=f"one of {MODELS}")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--stream", action="store_true",
                      help="profile one live EndoMamba-S frame instead of a training step")
  parser.add_argument("--batch", type=int, default=1, help="streams per frame with --stream")
  parser.add_argument("--small", action="store_true", help="tiny model and clip (CPU)")
  parser.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
  parser.add_argument("--top", type=int, default=40, help="rows of the per-op table")
  parser.add_argument("--scan-backend", default="auto")
  parser.add_argument("--trace-dir", default=None, help="keep the raw trace here")
  parser.add_argument("--no-command-buffers", action="store_true",
                      help="XLA GPU command buffers off, so every kernel names its instruction")
  args = parser.parse_args(argv)
  if args.model not in MODELS:
    parser.error(f"unknown model {args.model!r}; choose from {MODELS}")
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  if args.batch < 1:
    parser.error(f"--batch must be at least 1, got {args.batch}")
  if args.no_command_buffers:  # XLA reads its flags when the first backend starts, below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_command_buffer=").strip()
  import jax

  what = (f"EndoMamba-S live frame, {args.batch} stream(s)" if args.stream
          else f"model {args.model}; remat {args.remat}")
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {what}; {args.steps} "
        "traced steps", flush=True)
  rows, totals, wall_ms = run_profile(args.model, args.remat, args.small, args.steps,
                                      args.trace_dir, args.scan_backend,
                                      stream_batch=args.batch if args.stream else 0)
  print_table(rows, totals, wall_ms, args.top)


if __name__ == "__main__":
  main()
