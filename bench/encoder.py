"""Encoder throughput: the whole data-free quantize_weight, and the modulator alone, against NumPy.

Shape: a 4096 x 4096 weight at OSR 2 with blocks of 128 -> 131072 chains of 256 samples (33.5 M
samples).

Whole encoder: sdq.quantize_weight (the core's encoder, cpp/include/sdq/encode.h: rotation,
resampling, normalisation, modulation and packing) against sdq.ref.quantize_weight_columnwise_ref,
the paper's algorithm as research code writes it in NumPy (float64 rotation, FFT resampling,
np.quantile, a Python loop over the 256 columns with every chain at once). The core runs at 1 and
2 threads (sdq._core.encode_rows, what quantize_weight calls) and through quantize_weight itself
(all cores); the NumPy code is single-threaded (no BLAS call). The fraction of codes that differ
is recorded (the reference rounds differently: see tests/test_encode.py).

Modulator alone: the core's sigma_delta_modulate against sdq.ref.sigma_delta_columnwise_ref on the
same normalised samples (identical codes, checked here).
Writes bench/results/encoder.json. Wall times, best of 3 (the NumPy runs: 1), on whatever load
the machine has: the load average is recorded; on a loaded machine the single-thread CPU times
(also recorded) compare the two more fairly.

    python bench/encoder.py [--out 4096] [--in 4096] [--osr 2] [--skip-modulator]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import sdq
from sdq import ref
from sdq._native import core

from _common import best_of, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--osr", type=float, default=2.0)
    ap.add_argument("--skip-modulator", action="store_true", help="time only the whole encoder")
    args = ap.parse_args()
    whole = whole_encoder(args.out, args.inp, args.osr)
    rows = [] if args.skip_modulator else modulator_alone(args.out, args.inp, args.osr)
    chains = args.out * -(-args.inp // 128)
    path = write_json("encoder.json", {
        "shape": [args.out, args.inp], "osr": args.osr, "block_size": 128, "chains": chains,
        "samples_per_chain": int(np.floor(128 * args.osr + 0.5)), "whole_encoder": whole,
        "modulator": rows, "load_average": os.getloadavg(), "machine": machine()})
    print(f"wrote {path}")


def whole_encoder(out: int, inp: int, osr: float) -> list[dict]:
    W = torch.randn(out, inp, generator=torch.Generator().manual_seed(0))
    signs = sdq.blocks.hadamard_signs(128, 0)
    rows = []
    for levels in ("binary", "ternary"):
        cfg = sdq.SDQConfig(osr=osr, levels=levels)
        t0, c0 = time.perf_counter(), time.process_time()  # one run: it takes seconds
        r = ref.quantize_weight_columnwise_ref(W.numpy(), osr, levels,
                                               signs=signs.astype(np.float64))
        t_ref, cpu_ref = time.perf_counter() - t0, time.process_time() - c0
        codes = sdq.quantize_weight(W, cfg).codes()
        differ = sum(int((codes[:, off:off + m] != want).sum()) for (_, _, _, m, off), want
                     in zip(ref.block_layout_ref(inp, 128, osr), r["codes"]))
        total = sum(c.size for c in r["codes"])
        timings = {t: best_of(lambda: core().encode_rows(W.numpy(), signs, levels, osr,
                                                         threads=t)) for t in (1, 2)}
        timings["quantize_weight"] = best_of(lambda: sdq.quantize_weight(W, cfg))
        c0 = time.process_time()
        core().encode_rows(W.numpy(), signs, levels, osr, threads=1)
        cpu_core = time.process_time() - c0
        for threads, t in timings.items():
            rows.append({"levels": levels, "threads": threads, "core_s": t, "numpy_s": t_ref,
                         "speedup": t_ref / t, "codes_differ_fraction": differ / total})
            print(f"whole encoder {out}x{inp} {levels:8s} threads={threads}: core "
                  f"{t * 1e3:7.1f} ms, NumPy {t_ref:6.2f} s, ratio {t_ref / t:6.1f}x "
                  f"(codes differ: {differ / total:.1e})")
        rows.append({"levels": levels, "threads": "1, CPU time", "core_s": cpu_core,
                     "numpy_s": cpu_ref, "speedup": cpu_ref / cpu_core,
                     "codes_differ_fraction": differ / total})
        print(f"whole encoder {out}x{inp} {levels:8s} CPU time, 1 thread: core "
              f"{cpu_core * 1e3:7.1f} ms, NumPy {cpu_ref:6.2f} s, ratio {cpu_ref / cpu_core:6.1f}x")
    return rows


def modulator_alone(out: int, inp: int, osr: float) -> list[dict]:
    rng = np.random.default_rng(0)
    m = int(np.floor(128 * osr + 0.5))
    chains = out * (inp // 128)
    z = rng.standard_normal((chains, m)).astype(np.float32)
    tau = np.quantile(np.abs(z), 0.55, axis=1).astype(np.float32)
    threads_all = os.cpu_count() or 1
    rows = []
    for levels in ("binary", "ternary"):
        t_ref = best_of(lambda: ref.sigma_delta_columnwise_ref(z, tau, 1, levels), repeat=1)
        want = ref.sigma_delta_columnwise_ref(z, tau, 1, levels)
        for threads in sorted({1, threads_all}):
            got = core().sigma_delta_modulate(z, tau, 1, levels, threads)
            assert np.array_equal(got, want), "core and reference disagree"
            t = best_of(lambda: core().sigma_delta_modulate(z, tau, 1, levels, threads))
            rows.append({"levels": levels, "threads": threads, "samples": z.size,
                         "core_s": t, "reference_s": t_ref, "speedup": t_ref / t,
                         "msamples_per_s": z.size / t / 1e6})
            print(f"{levels:8s} threads={threads}: core {t * 1e3:8.1f} ms "
                  f"({z.size / t / 1e6:7.0f} Msamples/s), reference loop {t_ref * 1e3:8.1f} ms, "
                  f"ratio {t_ref / t:6.1f}x")
    return rows


if __name__ == "__main__":
    main()
