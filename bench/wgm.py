"""WGM partition time on every decoder linear of the default model (SmolLM2-135M), core vs NumPy.

Three modes, as method.md section 2 describes them:
  per-matrix: each linear's |W| flattened and sorted, windowed greedy (windows of --window values
              merged to --groups groups). Matrices of the same size go to the core as the rows of
              one call, so threads split them.
  per-matrix greedy: the same matrices, greedy merging from single values (sdq's default). The
              O(n^2) NumPy reference cannot run on whole matrices (331k-885k values): it runs on
              an evenly strided sample of --ref-greedy-values sorted values of each subset matrix,
              and the core on that same sample for the ratio.
  block:      each row of W cut into blocks of --block consecutive weights, each block's |w| sorted
              and partitioned on its own into --block-groups groups (greedy from singletons: a
              block is shorter than one window). All the model's blocks in one call.
Sorting is not part of the partition time; it is reported once on its own.

The baseline is sdq.ref.wgm_partition_ref, the same algorithm written the plain NumPy way (every
merge cost recomputed at each step, all rows of a call at once). It is too slow for the whole model,
so it runs on the first --ref-layers decoder layers, the core runs on that same subset in the same
run (ratio on identical inputs, boundaries checked identical), and the core alone on the whole
model. Writes bench/results/wgm.json.

    python bench/wgm.py [--groups 32] [--window 512] [--block 64] [--block-groups 4]
                        [--ref-layers 1] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np
import torch

from sdq import ref
from sdq._native import core
from sdq.data import load_model
from sdq.traversal import decoder_layers, linear_modules

from _common import best_of, machine, write_json


def model_weights() -> list[list[np.ndarray]]:
    """Per decoder layer, the float32 weights of its linears."""
    model, _ = load_model()
    with torch.no_grad():
        return [[m.weight.detach().float().numpy().copy() for m in linear_modules(layer).values()]
                for layer in decoder_layers(model)]


def per_matrix_rows(weights: list[np.ndarray]) -> list[np.ndarray]:
    """Sorted |W| of each matrix, stacked by size: one [matrices, n] array per distinct n."""
    by_n = defaultdict(list)
    for w in weights:
        by_n[w.size].append(np.sort(np.abs(w).ravel()))
    return [np.stack(rows) for _, rows in sorted(by_n.items())]


def block_rows(weights: list[np.ndarray], block: int) -> np.ndarray:
    """Sorted |w| of every `block` consecutive weights of every row: [blocks, block]."""
    for w in weights:
        if w.shape[1] % block:
            raise ValueError(f"in_features {w.shape[1]} is not a multiple of --block {block}")
    return np.concatenate([np.sort(np.abs(w).reshape(-1, block), axis=1) for w in weights])


def core_time(batches, threads: int, repeat: int = 3, **kw) -> float:
    return best_of(lambda: [core().wgm_partition(b, threads=threads, **kw) for b in batches],
                   repeat=repeat)


def measure(name, whole, subset, kw, threads_list, repeat_model=3) -> dict:
    """Core on the whole model and on the subset (each thread count), reference on the subset."""
    n_whole = sum(b.size for b in whole)
    n_sub = sum(b.size for b in subset)
    t0 = time.perf_counter()
    want = [ref.wgm_partition_ref(b, kw["groups"], kw["window"], 0.75, kw["method"])
            for b in subset]
    t_ref = time.perf_counter() - t0
    got = [core().wgm_partition(b, **kw) for b in subset]
    assert all(np.array_equal(g, w) for g, w in zip(got, want)), "core and reference disagree"
    rows = []
    for threads in threads_list:
        t_all = core_time(whole, threads, repeat=repeat_model, **kw)
        t_sub = core_time(subset, threads, **kw)
        rows.append({"threads": threads, "model_s": t_all,
                     "model_ns_per_weight": t_all / n_whole * 1e9, "subset_s": t_sub,
                     "subset_ns_per_weight": t_sub / n_sub * 1e9,
                     "speedup_vs_reference": t_ref / t_sub})
        print(f"{name:10s} threads={threads}: model {t_all * 1e3:8.1f} ms "
              f"({t_all / n_whole * 1e9:6.2f} ns/weight); subset {t_sub * 1e3:7.1f} ms vs "
              f"NumPy {t_ref * 1e3:8.1f} ms ({t_ref / n_sub * 1e9:7.1f} ns/weight): "
              f"{t_ref / t_sub:6.1f}x")
    return {**kw, "weights": n_whole, "rows": sum(len(b) for b in whole),
            "subset_weights": n_sub, "reference_s": t_ref,
            "reference_ns_per_weight": t_ref / n_sub * 1e9, "core": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--block-groups", type=int, default=4)
    ap.add_argument("--ref-layers", type=int, default=1)
    ap.add_argument("--ref-greedy-values", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    layers = model_weights()
    everything = [w for layer in layers for w in layer]
    subset = [w for layer in layers[: args.ref_layers] for w in layer]
    t0 = time.perf_counter()
    matrices = per_matrix_rows(everything)
    t_sort = time.perf_counter() - t0
    print(f"{len(everything)} linears, {sum(w.size for w in everything) / 1e6:.1f} M weights; "
          f"sorting |W| per matrix took {t_sort:.2f} s (not counted below)")
    per_matrix = measure("per-matrix", matrices, per_matrix_rows(subset),
                         dict(groups=args.groups, window=args.window, method="windowed"),
                         args.threads)
    sampled = [b[:, :: max(1, b.shape[1] // args.ref_greedy_values)] for b in
               per_matrix_rows(subset)]
    greedy = measure("greedy", matrices, [np.ascontiguousarray(b) for b in sampled],
                     dict(groups=args.groups, window=args.window, method="greedy"),
                     args.threads, repeat_model=1)
    greedy["reference_sample_values"] = int(sampled[0].shape[1])
    block = measure("block", [block_rows(everything, args.block)], [block_rows(subset, args.block)],
                    dict(groups=args.block_groups, window=args.block, method="greedy"),
                    args.threads, repeat_model=1)  # seconds per run: one timed run is enough
    block["block"] = args.block
    load = os.getloadavg()[0]  # other jobs on the machine skew times, most of all with 2 threads
    print(f"1-minute load average during the run: {load:.1f} on {os.cpu_count()} CPUs")
    path = write_json("wgm.json", {
        "model": "SmolLM2-135M (sdq.data.load_model default)", "linears": len(everything),
        "reference_subset": f"first {args.ref_layers} decoder layer(s)",
        "sort_per_matrix_s": t_sort, "per_matrix": per_matrix, "per_matrix_greedy": greedy,
        "block": block,
        "load_average_1m": load, "torch_threads": torch.get_num_threads(),
        "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
