"""Add-only CUDA kernels vs torch fp16 F.linear, batch 1 and 16, on the GPU.

Usage:  python bench/kernels_gpu.py [--quick] [--out bench/results/kernels_gpu.json]

For each shape (out x in), OSR, code alphabet and batch it times cuda_addonly_gemm alone (as
chosen by kernel="auto", and each kernel family forced), with cuda_activation_transform in front,
and torch.nn.functional.linear on fp16 weights of the same shape, all in the same run, by CUDA
events around replays of CUDA graphs: the GPU's time, not the host's launch rate (the eager
figure, gemm_eager_us, is kept beside it). Each call uses the next of several layers' weights,
enough to exceed the L2 cache, so the numbers are HBM numbers. Effective bandwidth counts the
bytes the GEMM must read once (bitplanes, fp16 scale and mean, xt, xsum) and write (y); % of peak
is against the datasheet figure for the device name and against a device-to-device copy
measured here (bytes read + written). Results go to bench/results/kernels_gpu.json (atomically).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from _common import write_json
from _gpu_timing import cuda_ready, time_eager, time_graph

PEAK_BYTES_PER_S = {  # datasheet HBM bandwidth by device-name substring (first match wins)
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
}
L2_BYTES_FLOOR = 64 << 20  # rotate over at least 2x this many bytes of weights

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (out, in)
OSRS = [1.0, 1.5, 2.0]
LEVELS = ["binary", "ternary"]
BATCHES = [1, 4, 16]
BLOCK = 128
KERNELS = ["table", "warp_rows", "tensor"]  # cuda_addonly_gemm's kernel families, each alone


def peak_for(name: str):
    for key, val in PEAK_BYTES_PER_S.items():
        if key in name:
            return val
    return None


def geometry(in_features: int, block: int, osr: float):
    nb = -(-in_features // block)
    blocks = []
    cc0 = None
    for b in range(nb):
        width = min(block, in_features - b * block)
        padded = 1 << max(0, (width - 1).bit_length())
        m = int(math.floor(padded * osr + 0.5))
        cc = -(-m // 32) * 32
        cc0 = cc if cc0 is None else cc0
        blocks.append((padded, m, b * cc0, cc))
    total = blocks[-1][2] + blocks[-1][3]
    return blocks, total


def copy_bandwidth() -> float:
    n = 256 << 20  # 1 GiB of float32
    a = torch.empty(n // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    t = time_eager(lambda i: b.copy_(a), 1, reps=5, min_calls=20)
    return 2 * a.numel() * 4 / t


def bench_case(core, out, inf, osr, levels, batch):
    blocks, total = geometry(inf, BLOCK, osr)
    nb, words = len(blocks), total // 32
    planes = 2 if levels == "ternary" else 1
    layer_bytes = planes * out * words * 4 + 2 * out * nb * 2
    n_layers = max(2, math.ceil(2 * L2_BYTES_FLOOR / layer_bytes))
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    signs = [torch.randint(-2**31, 2**31 - 1, (out, words), dtype=torch.int32, device=dev,
                           generator=g) for _ in range(n_layers)]
    nzs = [torch.randint(-2**31, 2**31 - 1, (out, words), dtype=torch.int32, device=dev,
                         generator=g) for _ in range(n_layers)] if planes == 2 else None
    scales = [torch.rand(out, nb, device=dev, generator=g).half() for _ in range(n_layers)]
    means = [torch.randn(out, nb, device=dev, generator=g).half() * 0.1 for _ in range(n_layers)]
    x = torch.randn(batch, inf, device=dev, generator=g)
    sg = torch.randint(0, 2, (BLOCK,), device=dev, generator=g).float() * 2 - 1
    (p0, m0, _, _), (pl, ml, _, _) = blocks[0], blocks[-1]
    d_full = torch.randn(p0, m0, device=dev, generator=g) / math.sqrt(p0)
    d_last = torch.randn(pl, ml, device=dev, generator=g) / math.sqrt(pl)
    xt = torch.empty(batch, total, device=dev)
    xsum = torch.empty(batch, nb, device=dev)
    y = torch.empty(batch, out, device=dev)

    def stream():
        return torch.cuda.current_stream().cuda_stream  # the capture stream inside a graph

    def act(_i):
        core.cuda_activation_transform(x.data_ptr(), batch, inf, BLOCK, osr, sg.data_ptr(),
                                       d_full.data_ptr(), d_last.data_ptr(), xt.data_ptr(),
                                       xsum.data_ptr(), stream())

    def gemm(i, kernel="auto"):
        core.cuda_addonly_gemm(signs[i].data_ptr(), nzs[i].data_ptr() if nzs else 0,
                               scales[i].data_ptr(), means[i].data_ptr(), xt.data_ptr(),
                               xsum.data_ptr(), y.data_ptr(), inf, BLOCK, osr, levels, out, batch,
                               stream(), kernel=kernel)

    act(0)
    torch.cuda.synchronize()
    t_kernel = {k: time_graph(lambda i: gemm(i, k), n_layers) for k in KERNELS}
    t_gemm = time_graph(gemm, n_layers)
    t_gemm_eager = time_eager(gemm, n_layers)
    t_act = time_graph(act, 1)
    t_both = time_graph(lambda i: (act(i), gemm(i)), n_layers)
    gemm_bytes = layer_bytes + batch * (total + nb) * 4 + batch * out * 4
    del signs, nzs, scales, means
    torch.cuda.empty_cache()

    # fp16 baseline, same shape, same rotation rule
    w_bytes = out * inf * 2
    n_fp16 = max(2, math.ceil(2 * L2_BYTES_FLOOR / w_bytes))
    ws = [torch.randn(out, inf, device=dev, dtype=torch.float16) for _ in range(n_fp16)]
    xh = x.half()
    t_fp16 = time_graph(lambda i: torch.nn.functional.linear(xh, ws[i]), n_fp16)
    fp16_bytes = w_bytes + batch * (inf + out) * 2
    del ws
    torch.cuda.empty_cache()
    return dict(out=out, in_features=inf, osr=osr, levels=levels, batch=batch,
                layers_rotated=n_layers, gemm_us=t_gemm * 1e6, gemm_eager_us=t_gemm_eager * 1e6,
                kernel_us={k: t * 1e6 for k, t in t_kernel.items()},
                kernel_gbps={k: gemm_bytes / t / 1e9 for k, t in t_kernel.items()},
                act_us=t_act * 1e6, act_plus_gemm_us=t_both * 1e6, fp16_linear_us=t_fp16 * 1e6,
                gemm_bytes=gemm_bytes, gemm_gbps=gemm_bytes / t_gemm / 1e9,
                fp16_gbps=fp16_bytes / t_fp16 / 1e9, speedup_vs_fp16=t_fp16 / t_both)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, OSR 1 and 2")
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes (default: all four)")
    ap.add_argument("--osrs", help="comma-separated OSRs (default: 1, 1.5, 2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "kernels_gpu.json"))
    args = ap.parse_args()
    if not cuda_ready("bench/kernels_gpu.py"):
        return 2
    import sdq._core as core
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    copy_bw = copy_bandwidth()
    shapes = SHAPES[:1] if args.quick else SHAPES
    osrs = [1.0, 2.0] if args.quick else OSRS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.osrs:
        osrs = [float(v) for v in args.osrs.split(",")]
    rows = []
    print(f"device: {name}; datasheet peak {peak / 1e9 if peak else float('nan'):.0f} GB/s; "
          f"measured copy {copy_bw / 1e9:.0f} GB/s")
    hdr = (f"{'out':>6} {'in':>6} {'osr':>4} {'levels':>7} {'b':>3} {'gemm us':>8} {'table':>7} "
           f"{'warp':>7} {'tensor':>7} {'eager':>7} {'act us':>7} {'GB/s':>6} {'%peak':>6} {'%copy':>6} "
           f"{'fp16 us':>8} {'x fp16':>6}")
    print(hdr)
    for (out, inf) in shapes:
        for osr in osrs:
            for levels in LEVELS:
                for batch in BATCHES:
                    r = bench_case(core, out, inf, osr, levels, batch)
                    r["pct_peak"] = 100 * r["gemm_gbps"] * 1e9 / peak if peak else None
                    r["pct_copy"] = 100 * r["gemm_gbps"] * 1e9 / copy_bw
                    rows.append(r)
                    pk = f"{r['pct_peak']:6.1f}" if peak else "   n/a"
                    ku = r["kernel_us"]
                    print(f"{out:>6} {inf:>6} {osr:>4} {levels:>7} {batch:>3} {r['gemm_us']:8.1f} "
                          f"{ku['table']:7.1f} {ku['warp_rows']:7.1f} {ku['tensor']:7.1f} "
                          f"{r['gemm_eager_us']:7.1f} "
                          f"{r['act_us']:7.1f} {r['gemm_gbps']:6.0f} {pk} {r['pct_copy']:6.1f} "
                          f"{r['fp16_linear_us']:8.1f} {r['speedup_vs_fp16']:6.2f}", flush=True)
    result = dict(device=name, peak_bytes_per_s=peak, copy_bytes_per_s=copy_bw,
                  torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  block_size=BLOCK, rows=rows)
    write_json(os.path.abspath(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
