"""Encoder throughput: the core's Sigma-Delta modulator vs the reference column-by-column loop.

Shape: a 4096 x 4096 weight at OSR 2 with blocks of 128 -> 131072 chains of 256 samples (33.5 M
samples). The baseline is sdq.ref.sigma_delta_columnwise_ref: the research code's approach, a
Python loop over the 256 columns with NumPy over all chains (its fastest form: every chain at once).
Both produce identical codes (checked here). Also timed: the whole quantize_weight (rotation,
resampling, normalisation, modulation, packing). Writes bench/results/encoder.json.

    python bench/encoder.py [--out 4096] [--in 4096] [--osr 2]
"""
from __future__ import annotations

import argparse
import os

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
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    m = int(np.floor(128 * args.osr + 0.5))
    chains = args.out * (args.inp // 128)
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
    W = torch.randn(args.out, args.inp)
    full = {}
    for levels in ("binary", "ternary"):
        cfg = sdq.SDQConfig(osr=args.osr, levels=levels)
        full[levels] = best_of(lambda: sdq.quantize_weight(W, cfg), repeat=1)
        print(f"quantize_weight {args.out}x{args.inp} {levels}: {full[levels]:.2f} s")
    path = write_json("encoder.json", {
        "shape": [args.out, args.inp], "osr": args.osr, "block_size": 128, "chains": chains,
        "samples_per_chain": m, "modulator": rows, "quantize_weight_s": full,
        "torch_threads": torch.get_num_threads(), "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
