"""What the layer solver's settings do to each linear's output error, calibration vs held-out.

    python bench/code_search.py [--calib-samples 32] [--layers 0,8,16,24,29] [--only NAME ...]

Captures the input Hessian of every linear of the chosen decoder layers of the default model
(full precision) twice: from the calibration sequences (seed 0) and from as many other sequences
(seed 1, held out). Each configuration quantizes those weights with quantize_weight_calibrated
against the calibration Hessians and reports the relative output error
tr(E H E^T) / tr(W H W^T) (E = dequantized - W) under both, as a geometric mean over the linears:
what the solver minimises, and what it should generalise to. Writes
bench/results/code_search.json. A layer-level proxy: bench/quality.py measures perplexity.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings

import torch

import sdq
from sdq.methods.sdq import quantize_weight_calibrated

from _common import RESULTS, machine, write_json

SDQ = sdq.SDQConfig
BEFORE = dict(code_search=False, percdamp=0.01)  # the solver before the code search
CONFIGS = {  # name -> SDQConfig keywords (codes="gram" throughout)
    "t2 before": dict(osr=2, levels="ternary", **BEFORE),
    "t2 percdamp 0.1": dict(osr=2, levels="ternary", code_search=False),
    "t2 code search, percdamp 0.01": dict(osr=2, levels="ternary", percdamp=0.01),
    "t2 default (search + percdamp 0.1)": dict(osr=2, levels="ternary"),
    "b2 before": dict(osr=2, levels="binary", **BEFORE),
    "b2 default": dict(osr=2, levels="binary"),
    "t1.5 before": dict(osr=1.5, levels="ternary", **BEFORE),
    "t1.5 default": dict(osr=1.5, levels="ternary"),
    "b3 before": dict(osr=3, levels="binary", **BEFORE),
    "b3 default": dict(osr=3, levels="binary"),
    # the beam search over the sequential choice (SDQConfig.beam), on top of the defaults
    **{f"t2 beam {k}": dict(osr=2, levels="ternary", beam=k) for k in (2, 4, 8)},
    "t2 beam 8, no code search": dict(osr=2, levels="ternary", beam=8, code_search=False),
    "b2.75 default": dict(osr=2.75, levels="binary"),
    "b2.75 beam 8": dict(osr=2.75, levels="binary", beam=8),
}


def capture(model, tokens, layers) -> dict:
    """{"layer.name": (weight, Hessian)} of every linear of the given layers."""
    from sdq.traversal import HessianAccumulator, decoder_layers, linear_modules
    blocks = decoder_layers(model)
    with contextlib.ExitStack() as stack:  # every chosen layer's hooks, one forward of the model
        accs = {i: stack.enter_context(HessianAccumulator(blocks[i])) for i in layers}
        for start in range(0, len(tokens), 4):
            model(input_ids=tokens[start:start + 4])
    out = {}
    for i, acc in accs.items():
        linears = linear_modules(blocks[i])
        for name, H in acc.hessians().items():
            out[f"{i}.{name}"] = (linears[name].weight.detach().clone(), H)
    return out


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E, W, H = (Q - W).double(), W.double(), H.double()
    return float(torch.einsum("oi,ij,oj->", E, H, E) / torch.einsum("oi,ij,oj->", W, H, W))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--layers", default="0,8,16,24,29")
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME",
                    help="run only these configurations; the other rows of code_search.json "
                    "are kept (same --calib-samples and --layers)")
    args = ap.parse_args()
    unknown = set(args.only or ()) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configurations: {sorted(unknown)}")
    from sdq.data import calibration_tokens, load_model
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore", category=sdq.CalibrationWarning)
    model, tok = load_model()
    layers = [int(x) for x in args.layers.split(",")]
    calib = capture(model, calibration_tokens(tok, args.calib_samples, 512, seed=0), layers)
    held = capture(model, calibration_tokens(tok, args.calib_samples, 512, seed=1), layers)
    rows = {}
    if args.only is not None:
        kept = json.loads((RESULTS / "code_search.json").read_text())
        if (kept["layers"], kept["calib_samples"]) != (layers, args.calib_samples):
            raise SystemExit("code_search.json was measured on other layers or calibration")
        rows = kept["rows"]
    for name, kw in CONFIGS.items():
        if args.only is not None and name not in args.only:
            continue
        cfg = SDQ(codes="gram", **kw)
        t0 = time.perf_counter()
        errs = {"calibration": [], "held_out": []}
        for key, (W, H) in calib.items():
            Q = quantize_weight_calibrated(W, H, cfg).dequantize().float()
            errs["calibration"].append(relative_error(W, Q, H))
            errs["held_out"].append(relative_error(W, Q, held[key][1]))
        gmean = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in errs.items()}
        rows[name] = {"config": cfg.to_dict(), **gmean, "seconds": time.perf_counter() - t0}
        print(f"{name:38s} calibration {gmean['calibration']:.5f}  held-out "
              f"{gmean['held_out']:.5f}  ({rows[name]['seconds']:.0f} s)", flush=True)
    write_json("code_search.json", {"layers": layers, "calib_samples": args.calib_samples,
                                    "linears": len(calib), "rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
