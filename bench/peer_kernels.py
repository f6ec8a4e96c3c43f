"""sdq's whole SDQLinear call beside torch dense and llama.cpp's ggml kernels, one run, same shape,
batch and threads: the measurement of ../shared/peer/compare_kernels.py with one difference.

usage: python bench/peer_kernels.py [--shape 4096x4096] [--batches 1,16,64] [--threads 2]
           [--copies 8] [--iters 20] [--ggml-types ...] [--same-input] [--out FILE]

Why a copy: the shared script feeds one input tensor to all its copies of the layer. sdq's copies
share their transform constants (same seed and geometry), so from the second call on sdq's
shared-transform cache (linear_plan.h: q/k/v reuse one activation transform) served every call,
and its figure left out the activation transform (about a third of the call at batch 1 and 64).
Here copy i reads input i, as a model's successive layers do: every sdq call transforms its input.
--same-input gives the shared script's figure (cache hits) for comparison. Everything else is the
shared script's: COPIES weights cycled so that figures come from memory, best of ITERS rotations,
ggml built by ../shared/peer/build_ggml.sh and timed by its ggml_matmul (the same copies, inputs
and threads). Writes bench/results/peer_kernels.json (atomically) and prints each variant's time
and how many times faster sdq's is.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import machine, write_json

import sdq
from sdq._native import core

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"


def best_ms(calls, iters: int) -> float:
    """Best mean time per call over `iters` rotations through every call, in ms."""
    for f in calls:
        f()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        for f in calls:
            f()
        best = min(best, (time.perf_counter() - t) / len(calls))
    return best * 1e3


def ggml_ms(binary: Path, kind: str, shape, batch: int, threads: int, iters: int,
            copies: int) -> float:
    out_f, in_f = shape
    p = subprocess.run([str(binary), kind, str(out_f), str(in_f), str(batch), str(threads),
                        str(iters), str(copies)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ggml_matmul {kind} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)["best_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ggml-types", default="F32,BF16,Q4_K,Q2_K,IQ2_XXS,TQ2_0,TQ1_0")
    ap.add_argument("--sdq", default="binary:2,ternary:2", help="levels:osr pairs")
    ap.add_argument("--same-input", action="store_true",
                    help="one input for every copy, as the shared script (sdq's cache hits)")
    ap.add_argument("--out", default="peer_kernels.json")
    a = ap.parse_args()
    shape = tuple(map(int, a.shape.lower().split("x")))
    out_f, in_f = shape
    build = subprocess.run(["bash", str(PEER / "build_ggml.sh")], check=True, capture_output=True,
                           text=True).stdout.strip()
    ggml_bin = Path(build).parent.parent / "ggml_matmul"

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    weights = [torch.randn(out_f, in_f) * 0.02 for _ in range(a.copies)]
    layers = {}
    for spec in a.sdq.split(","):
        levels, osr = spec.split(":")
        cfg = sdq.SDQConfig(osr=float(osr), levels=levels)
        layers[f"sdq-{levels}-osr{osr}"] = [
            sdq.SDQLinear.from_quantized(sdq.quantize_weight(W, cfg)) for W in weights]

    rows = []
    with torch.inference_mode():
        for batch in map(int, a.batches.split(",")):
            xs = [torch.randn(batch, in_f) for _ in range(1 if a.same_input else a.copies)]
            xs = xs * a.copies if a.same_input else xs
            xbs = [x.bfloat16() for x in xs]
            r = {"torch-fp32": best_ms([lambda W=W, x=x: torch.nn.functional.linear(x, W)
                                        for W, x in zip(weights, xs)], a.iters),
                 "torch-bf16": best_ms([lambda W=W.bfloat16(), x=x: torch.nn.functional.linear(x, W)
                                        for W, x in zip(weights, xbs)], a.iters)}
            for name, ls in layers.items():
                r[name] = best_ms([lambda m=m, x=x: m(x) for m, x in zip(ls, xs)], a.iters)
            for kind in a.ggml_types.split(","):
                r[f"ggml-{kind}"] = ggml_ms(ggml_bin, kind, shape, batch, a.threads, a.iters,
                                            a.copies)
            print(f"\n{a.shape} batch {batch}, {a.threads} threads, best ms of {a.iters} "
                  f"(x: sdq's time / this; > 1 means this is faster than sdq)")
            for name, ms in sorted(r.items(), key=lambda kv: kv[1]):
                rel = "  ".join(f"{s}: {r[s] / ms:5.2f}x" for s in layers)
                print(f"  {name:22s} {ms:8.3f} ms   {rel}")
                rows.append({"shape": a.shape, "batch": batch, "threads": a.threads,
                             "variant": name, "best_ms": round(ms, 4)})
    path = write_json(a.out, {"machine": machine(), "same_input": a.same_input,
                              "amx": core().amx_gemm_supported(), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
