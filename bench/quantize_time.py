"""Where the time of `sdq quantize` goes, by component (wall clock, from one profiled run).

    python bench/quantize_time.py [--calib-samples 64] [--device cpu] [--out /tmp/sdq-t2]
                                  [--json /tmp/quantize_time.json]

Runs the README's main job (`sdq quantize --osr 2 --levels ternary --calib-samples N --out DIR`,
perplexity before and after on 20,480 tokens) under cProfile and prints the seconds spent in:
model load/convert, eval before, eval after, capture of layer 0's inputs, the Hessian forward
(the layer run with hooks, Hessian products included), the Hessian products alone, code
selection (Gram factor, rounding loop, refit), GPTQ compensation and packing (the rest of
quantize_weight_calibrated), the forward through each quantized layer, and save. cProfile adds
some overhead to the many small calls; the whole-job wall time is printed too.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

# (component, module file suffix, function name): that function's cumulative time
COMPONENTS = [
    ("model load/convert", "sdq/data.py", "load_model"),
    ("eval (before + after)", "sdq/evaluate.py", "perplexity"),
    ("capture layer-0 inputs", "sdq/traversal.py", "capture_layer_inputs"),
    ("Hessian forward (with products)", "sdq/pipeline.py", "_layer_hessians"),
    ("  of which Hessian products", "sdq/traversal.py", "add"),
    ("quantize linears (all below)", "sdq/methods/sdq.py", "quantize_weight_calibrated"),
    ("  prepare H (Cholesky of H^-1)", "sdq/gptq.py", "prepare_hessian"),
    ("  code selection: Gram factor", "sdq/methods/gram.py", "_gram_factors"),
    ("  code selection: rounding loop", "sdq/methods/gram.py", "select_codes"),
    ("  code selection: normalise", "sdq/methods/normalise.py", "normalise"),
    ("  scale/mean refit", "sdq/methods/gram.py", "refit_scale_mean"),
    ("  decode block", "sdq/methods/sdq.py", "decode_rows"),
    ("layer forwards (Hessian + quantized)", "sdq/traversal.py", "run_layer"),
    ("save", "sdq/io.py", "save"),
]


def _cumulative(stats: pstats.Stats, suffix: str, func: str) -> float:
    return sum(cum for (path, _, name), (_, _, _, cum, _) in stats.stats.items()
               if name == func and path.endswith(suffix))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sdq-quantize-time"))
    ap.add_argument("--json", type=Path, default=None, help="write the table here too")
    args = ap.parse_args(argv)
    from sdq.cli import main as sdq_main
    job = ["quantize", "--osr", "2", "--levels", "ternary", "--calib-samples",
           str(args.calib_samples), "--device", args.device, "--out", str(args.out), "--overwrite"]
    profile = cProfile.Profile(time.perf_counter)
    start = time.perf_counter()
    profile.enable()
    status = sdq_main(job)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    table = {label: _cumulative(stats, *key) for label, *key in COMPONENTS}
    table["  of which quantized layers' forward"] = (
        table["layer forwards (Hessian + quantized)"] - table["Hessian forward (with products)"])
    table["whole job"] = wall
    print(f"\nsdq {' '.join(job)}  (exit {status})")
    for label, seconds in table.items():
        print(f"{label:<36} {seconds:8.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
