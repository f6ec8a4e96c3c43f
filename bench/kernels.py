"""CPU add-only kernels vs torch dense F.linear (fp32 and bf16), batch 1 and 16.

Usage:  python bench/kernels.py [--quick] [--threads N] [--out bench/results/kernels_cpu.json]

For each shape (out x in), OSR and code alphabet it times the sdq path (activation_transform +
addonly_gemm) and the GEMM alone, and torch.nn.functional.linear on fp32 and bf16 weights of the
same shape, all in the same run with the same thread count. Each call uses the next of several
copies of the layer, enough to exceed the last-level cache, as a model's layers would: numbers are
memory numbers, not cache numbers. Times are the best of several repetitions of a rotation (the
minimum, not the median: on a shared 2-core machine the median mostly measures the neighbours).
Effective bandwidth = bytes of packed codes + fp16 scale and mean read per call / GEMM time.
Results go to bench/results/kernels_cpu.json (written atomically).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from _common import write_json

from sdq import _core

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (out, in)
OSRS = [1.0, 1.5, 2.0]
LEVELS = ["binary", "ternary"]
BATCHES = [1, 16]
BLOCK = 128
CACHE_BYTES = 32 << 20  # last-level cache of the reference machine; rotate over 2x this


def geometry(in_features: int, osr: float):
    info = _core.layout(in_features, BLOCK, osr)
    return info


def copies_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(2 * CACHE_BYTES / max(nbytes, 1))))


def time_rotating(fn, n: int, reps: int, min_calls: int) -> float:
    """Best seconds per call of fn(i) over `reps` rotations, i cycling over n layer copies."""
    calls = max(n, min_calls)
    for i in range(n):  # warm up every copy once
        fn(i)
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for k in range(calls):
            fn(k % n)
        samples.append((time.perf_counter() - t) / calls)
    return min(samples)


def random_layer(rng, out, inf, osr, levels):
    geo = geometry(inf, osr)
    words, nb = geo["words_per_row"], len(geo["m"])
    sign = rng.integers(0, 2**32, (out, words), dtype=np.uint32)
    nonzero = None
    if levels == "ternary":  # the sign bit of a zero code is 0: sign is a subset of nonzero
        nonzero = sign | rng.integers(0, 2**32, (out, words), dtype=np.uint32)
    scale = rng.uniform(0.01, 0.1, (out, nb)).astype(np.float16).view(np.uint16)
    mean = (0.01 * rng.standard_normal((out, nb))).astype(np.float16).view(np.uint16)
    return sign, nonzero, scale, mean


def packed_bytes(layer) -> int:
    return sum(a.nbytes for a in layer if a is not None)


def bench_dense(rng, out, inf, batch, reps, min_calls):
    w = torch.from_numpy(rng.standard_normal((out, inf), dtype=np.float32))
    res = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = copies_for(out * inf * (4 if dtype == torch.float32 else 2))
        ws = [(w + 0.0).to(dtype) for _ in range(n)]  # distinct copies, distinct memory
        x = torch.randn(batch, inf).to(dtype)
        with torch.inference_mode():
            res[name] = time_rotating(lambda i: torch.nn.functional.linear(x, ws[i]), n, reps,
                                      min_calls)
        del ws
    return res


def bench_sdq(rng, out, inf, osr, levels, batch, threads, reps, min_calls):
    geo = geometry(inf, osr)
    layer0 = random_layer(rng, out, inf, osr, levels)
    n = copies_for(packed_bytes(layer0))
    layers = [layer0] + [random_layer(rng, out, inf, osr, levels) for _ in range(n - 1)]
    p0, m0, pl, ml = geo["padded"][0], geo["m"][0], geo["padded"][-1], geo["m"][-1]
    down_full = _core.resample_matrix(m0, p0)
    down_last = _core.resample_matrix(ml, pl)
    signs = rng.choice([-1.0, 1.0], BLOCK).astype(np.float32)
    x = rng.standard_normal((batch, inf), dtype=np.float32)
    xt, xsum = _core.activation_transform(x, BLOCK, osr, signs, down_full, down_last, threads)

    def gemm(i):
        return _core.addonly_gemm(*layers[i], xt, xsum, inf, BLOCK, osr, threads)

    def full(i):
        t, s = _core.activation_transform(x, BLOCK, osr, signs, down_full, down_last, threads)
        return _core.addonly_gemm(*layers[i], t, s, inf, BLOCK, osr, threads)

    return {"gemm": time_rotating(gemm, n, reps, min_calls),
            "transform+gemm": time_rotating(full, n, reps, min_calls),
            "packed_bytes": packed_bytes(layer0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096 x 4096 only, OSR 1 and 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "kernels_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes, osrs = (SHAPES[:1], [1.0, 2.0]) if args.quick else (SHAPES, OSRS)
    reps, min_calls = (5, 10) if args.quick else (5, 8)
    rng = np.random.default_rng(0)
    rows = []
    print(f"kernel {_core.addonly_kernel_name()}, threads {args.threads}, torch {torch.__version__}")
    print(f"{'out x in':>12} {'batch':>5} {'osr':>4} {'levels':>7} | {'sdq ms':>7} {'gemm ms':>7} "
          f"{'GB/s':>6} | {'fp32 ms':>7} {'bf16 ms':>7} | {'fp32/sdq':>8} {'bf16/sdq':>8}")
    for out, inf in shapes:
        for batch in BATCHES:
            dense = bench_dense(rng, out, inf, batch, reps, min_calls)
            for osr in osrs:
                for levels in LEVELS:
                    s = bench_sdq(rng, out, inf, osr, levels, batch, args.threads, reps, min_calls)
                    row = {"out": out, "in": inf, "batch": batch, "osr": osr, "levels": levels,
                           "sdq_s": s["transform+gemm"], "gemm_s": s["gemm"],
                           "fp32_s": dense["fp32"], "bf16_s": dense["bf16"],
                           "packed_bytes": s["packed_bytes"],
                           "gemm_gb_per_s": s["packed_bytes"] / s["gemm"] / 1e9,
                           "fp32_over_sdq": dense["fp32"] / s["transform+gemm"],
                           "bf16_over_sdq": dense["bf16"] / s["transform+gemm"]}
                    rows.append(row)
                    print(f"{out:>5} x {inf:<5} {batch:>5} {osr:>4} {levels:>7} | "
                          f"{row['sdq_s'] * 1e3:7.3f} {row['gemm_s'] * 1e3:7.3f} "
                          f"{row['gemm_gb_per_s']:6.1f} | {row['fp32_s'] * 1e3:7.3f} "
                          f"{row['bf16_s'] * 1e3:7.3f} | {row['fp32_over_sdq']:8.2f} "
                          f"{row['bf16_over_sdq']:8.2f}", flush=True)
    result = {"kernel": _core.addonly_kernel_name(), "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(),
              "processor": platform.processor(), "cpu_count": os.cpu_count(),
              "quick": args.quick, "block_size": BLOCK, "rows": rows}
    write_json(os.path.abspath(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
