"""Whole SDQLinear calls on the GPU vs torch F.linear in fp16/bf16, batch 1 and 16.

Usage:  python bench/layer_gpu.py [--quick] [--out bench/results/layer_gpu.json]

What a user runs: `layer(x)` of an SDQLinear moved to the GPU (activation transform, add-only
GEMM, dtype round trip, Python and op dispatch), timed eagerly and replayed from a CUDA graph
(which removes the host's launch cost and leaves the kernels' time). The layers hold random
codes (data-free: speed does not depend on their values); each call takes the next of several
layers, enough to exceed the L2 cache. Before timing, each configuration's output is checked
against x @ W_hat^T from the layer's own dequantized weight. Results go to
bench/results/layer_gpu.json (atomically).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from _common import write_json
from _gpu_timing import cuda_ready, time_eager, time_graph

SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192)]  # (out, in)
CONFIGS = [("binary", 1.0), ("binary", 2.0), ("ternary", 1.0), ("ternary", 2.0)]
BATCHES = [1, 16]
L2_FLOOR = 128 << 20  # rotate over at least this many bytes of weights


def random_layer(out: int, n_in: int, levels: str, osr: float, seed: int):
    """An SDQLinear with random codes, fp16 scales and means, on the GPU."""
    import sdq._core as core
    from sdq.config import SDQConfig
    from sdq.nn import SDQLinear
    from sdq.weight import QuantizedWeight

    cfg = SDQConfig(osr=osr, levels=levels)
    rng = np.random.default_rng(seed)
    lay = core.layout(n_in, cfg.block_size, osr)
    codes = np.zeros((out, lay["total_code_cols"]), dtype=np.int8)
    alphabet = np.array([-1, 1] if levels == "binary" else [-1, 0, 1], dtype=np.int8)
    for off, m in zip(lay["code_offset"], lay["m"]):
        codes[:, off:off + m] = rng.choice(alphabet, (out, m))
    nb = lay["num_blocks"]
    scale = torch.from_numpy(rng.uniform(0.005, 0.02, (out, nb)).astype(np.float16))
    mean = torch.from_numpy((1e-3 * rng.standard_normal((out, nb))).astype(np.float16))
    signs = torch.from_numpy(rng.choice(np.array([-1, 1], dtype=np.int8), cfg.block_size))
    qw = QuantizedWeight.from_codes(out, n_in, cfg, codes, scale, mean, signs)
    return SDQLinear.from_quantized(qw).cuda(), qw


def layer_bytes(layer) -> int:
    """Bytes the GPU kernels read per call: the bitplanes they use, scales and means."""
    sign, nonzero = layer.bitplanes()
    planes = [sign] + ([nonzero] if nonzero is not None else [])
    return sum(t.numel() * t.element_size() for t in planes + [layer.scale, layer.mean])


def graph_or_none(fn, n: int) -> float | None:
    """time_graph, or None when the call cannot be captured in a CUDA graph."""
    try:
        return time_graph(fn, n, reps=5, min_calls=n)
    except RuntimeError as e:
        print(f"  (graph capture failed: {str(e).splitlines()[0]})", file=sys.stderr)
        return None


def relerr(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def bench_shape(out: int, n_in: int, levels: str, osr: float, batches, dtype) -> list[dict]:
    layer0, qw = random_layer(out, n_in, levels, osr, seed=0)
    nbytes = layer_bytes(layer0)
    n = max(2, math.ceil(L2_FLOOR / nbytes))
    layers = [layer0] + [random_layer(out, n_in, levels, osr, seed=s)[0] for s in range(1, n)]
    w_hat = qw.dequantize().cuda()
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, n_in, device="cuda").to(dtype)
            err = relerr(layer0(x), x.float() @ w_hat.T)
            if err > 5e-3:  # exact float32 kernels; fp16 output rounding is ~3e-4
                raise AssertionError(f"{out}x{n_in} {levels} OSR {osr} b{batch}: "
                                     f"relative error {err:.2e} against x @ W_hat^T")
            t_eager = time_eager(lambda i: layers[i](x), n)
            t_graph = graph_or_none(lambda i: layers[i](x), n)
            rows.append(dict(out=out, in_features=n_in, levels=levels, osr=osr, batch=batch,
                             dtype=str(dtype).replace("torch.", ""), layers_rotated=n,
                             read_bytes=nbytes, relerr=err, eager_us=t_eager * 1e6,
                             graph_us=None if t_graph is None else t_graph * 1e6,
                             graph_gbps=None if t_graph is None else nbytes / t_graph / 1e9))
    del layers, w_hat
    torch.cuda.empty_cache()
    return rows


def bench_dense(out: int, n_in: int, batch: int, dtype) -> dict:
    n = max(2, math.ceil(L2_FLOOR / (out * n_in * 2)))
    ws = [torch.randn(out, n_in, device="cuda", dtype=dtype) for _ in range(n)]
    x = torch.randn(batch, n_in, device="cuda", dtype=dtype)
    with torch.inference_mode():
        t_eager = time_eager(lambda i: torch.nn.functional.linear(x, ws[i]), n)
        t_graph = graph_or_none(lambda i: torch.nn.functional.linear(x, ws[i]), n)
    del ws
    torch.cuda.empty_cache()
    return dict(eager_us=t_eager * 1e6, graph_us=None if t_graph is None else t_graph * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "layer_gpu.json"))
    args = ap.parse_args()
    if not cuda_ready("bench/layer_gpu.py"):
        return 2
    name = torch.cuda.get_device_name()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    print(f"device: {name}")
    print(f"{'out':>6} {'in':>6} {'levels':>7} {'osr':>4} {'b':>3} {'dtype':>8} {'eager us':>9} "
          f"{'graph us':>9} {'GB/s':>6} {'fp16 eager':>10} {'fp16 graph':>10} {'x fp16 (graph)':>14}")
    for out, n_in in shapes:
        dense = {b: bench_dense(out, n_in, b, torch.float16) for b in BATCHES}
        for levels, osr in CONFIGS:
            for r in bench_shape(out, n_in, levels, osr, BATCHES, torch.float16):
                d = dense[r["batch"]]
                r["fp16_eager_us"], r["fp16_graph_us"] = d["eager_us"], d["graph_us"]
                ratio = (d["graph_us"] / r["graph_us"]) if r["graph_us"] and d["graph_us"] else None
                r["speedup_vs_fp16_graph"] = ratio
                rows.append(r)
                g = f"{r['graph_us']:9.1f}" if r["graph_us"] else "      n/a"
                bw = f"{r['graph_gbps']:6.0f}" if r["graph_gbps"] else "   n/a"
                dg = f"{d['graph_us']:10.1f}" if d["graph_us"] else "       n/a"
                rt = f"{ratio:14.2f}" if ratio else "           n/a"
                print(f"{out:>6} {n_in:>6} {levels:>7} {osr:>4} {r['batch']:>3} {r['dtype']:>8} "
                      f"{r['eager_us']:9.1f} {g} {bw} {d['eager_us']:10.1f} {dg} {rt}",
                      flush=True)
    result = dict(device=name, torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  rows=rows)
    write_json(os.path.abspath(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
