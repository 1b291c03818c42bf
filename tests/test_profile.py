"""bench.profile: a real profiler trace of a tiny training step, attributed to modules and passes."""

from vidssm_jax.bench import profile


def test_place_folds_layers_and_names_the_pass():
  bwd = ("jit(step)/transpose(jvp(EViM3.pretrain_loss))/EViM3._predict/decoder/stack/while/body/"
         "closed_call/blocks/layers_4/layers_4.forward/mixer/in_proj/dot_general")
  assert profile.place(bwd) == ("bwd", "EViM3._predict/decoder/stack/blocks/layers_*/mixer/"
                                       "in_proj/dot_general")
  fwd = "jit(step)/jvp(ViT)/blocks/jit(take_along_axis)/gather"
  assert profile.place(fwd) == ("fwd", "blocks/take_along_axis/gather")
  assert profile.place("jit(step)/add")[0] == "opt"


def test_op_names_reads_instruction_metadata():
  text = ('  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fc, '
          'metadata={op_name="jit(step)/jvp(M)/mul" source_file="x.py"}\n'
          '  ROOT %dot.1 = f32[4]{0} dot(%a, %b), metadata={op_name="jit(step)/dot_general"}\n')
  assert profile.op_names(text) == {"fusion.3": "jit(step)/jvp(M)/mul",
                                    "dot.1": "jit(step)/dot_general"}


def test_profile_of_a_real_step_attributes_its_ops():
  rows, totals, wall_ms = profile.run_profile("vit_s", "none", small=True, steps=1,
                                              trace_dir=None, scan_backend="auto")
  assert wall_ms > 0 and rows
  attributed = sum(ms for ph, _, ms, _ in rows if ph != "?")
  assert attributed > 0.5 * sum(ms for _, _, ms, _ in rows)
  assert totals["pass"]["fwd"] > 0 and totals["pass"]["bwd"] > 0
  assert any(w.endswith("dot_general") and ph == "bwd" for ph, w, _, _ in rows)


def test_profile_of_a_live_frame_counts_every_op_as_the_frame():
  rows, totals, wall_ms = profile.run_profile("", "none", small=True, steps=2, trace_dir=None,
                                              scan_backend="auto", stream_batch=1)
  assert wall_ms > 0 and rows
  assert set(totals["pass"]) <= {"frame", "?"} and totals["pass"]["frame"] > 0
  assert any("temporal_blocks" in w and w.endswith("dot_general") for _, w, _, _ in rows)
