"""``python -m vidssm_jax.convert --from SOURCE --input FILE --preset NAME --output DIR``.

Reads a release checkpoint (``.pth``, ``.safetensors`` or ``.npz``), converts it for the
registered model ``NAME`` (``create_model(NAME)``) and writes a checkpoint that
``--config.finetune.init_from=DIR`` and ``vidssm_jax.convert.load_params(DIR)`` read. Bad input
is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from vidssm_jax import convert


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m vidssm_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True, choices=sorted(convert.SOURCES),
                      help="which release the checkpoint comes from")
  parser.add_argument("--input", required=True, help="release checkpoint file")
  parser.add_argument("--preset", required=True, help="registered model name, e.g. evim3_p4")
  parser.add_argument("--output", required=True, help="directory to write the checkpoint to")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from vidssm_jax.models.registry import create_model

  try:
    print(f"convert: reading {args.input}", flush=True)
    state = convert.read_state_dict(args.input)
    print(f"convert: {len(state)} arrays, {sum(v.size for v in state.values()):,} values",
          flush=True)
    model = create_model(args.preset)
    print(f"convert: converting {args.source} -> {args.preset}", flush=True)
    params = convert.convert_state_dict(args.source, state, model)
  except ValueError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  import jax

  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"convert: {n:,} parameters filled", flush=True)
  out = convert.save_params(params, args.output)
  print(f"convert: wrote {out} (use --config.finetune.init_from={out})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
