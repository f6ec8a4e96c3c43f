"""Per-call cost of an SDQLinear call at batch 1: the whole module call against its C++ work.

Usage:  python bench/overhead.py [--quick] [--threads 2] [--no-compile]
                                 [--out bench/results/overhead.json]

For each shape (out x in; the default model's 576x576, 1536x576, 576x1536 and 4096x4096) and
code alphabet (binary, ternary; OSR 2) it times, at batch 1 with the same thread count:
  module    the whole eager SDQLinear call (nn.Module call, checks, one LinearPlan call)
  plan      the plan's C++ time alone (LinearPlan.run on NumPy arrays)
  two_ops   the path before the plan: the NumPy bindings of activation_transform and
            addonly_gemm called one after the other from Python, as the eager call did
  compiled  the module under torch.compile (inductor): the ops' CPU kernels (transform + table GEMM)
  linear    torch.nn.functional.linear on the fp32 weight of the same shape
and the ratios module / linear and module - plan (the Python overhead per call); then module,
plan and linear again on one thread in CPU time of the calling thread (time.thread_time), which a
busy machine disturbs far less than wall time. Each call uses
the next of several copies of the layer (enough to exceed the last-level cache, as a model's
layers would) and alternates between two inputs, so the shared-transform cache never serves a
repeated input. Times are the minimum over repetitions of a rotation: on a shared machine the
median mostly measures the neighbours. Results go to bench/results/overhead.json (atomically).
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from _common import machine, write_json

import sdq
from sdq import ops
from sdq._native import core

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
LEVELS = ["binary", "ternary"]
OSR = 2.0
CACHE_BYTES = 32 << 20  # rotate over at least twice this many bytes of fp32 weights


def time_rotating(fn, n: int, reps: int, calls: int, clock=time.perf_counter) -> float:
    """Best microseconds per call of fn(k) over `reps` rotations of `calls` calls, k the call's
    number (fn picks copy k % n and input k & 1: consecutive calls never share an input)."""
    for k in range(max(n, 2)):
        fn(k)
    best = math.inf
    for _ in range(reps):
        t = clock()
        for k in range(calls):
            fn(k)
        best = min(best, (clock() - t) / calls)
    return best * 1e6


def two_ops(mod, views, x: np.ndarray) -> torch.Tensor:
    """The eager path before LinearPlan: two NumPy-binding calls from Python."""
    sign, nonzero, scale, mean, signs, down_full, down_last = views
    cfg, c = mod.config, core()
    xt, xsum = c.activation_transform(x, cfg.block_size, cfg.osr, signs, down_full, down_last)
    y = c.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, mod.in_features, cfg.block_size,
                       cfg.osr)
    return torch.from_numpy(y)


def numpy_views(mod) -> tuple:
    sign, nonzero = mod.bitplanes()
    scale, mean, (signs, down_full, down_last) = mod.scale, mod.mean, mod.transform_constants()
    return (ops._np(sign, np.uint32), None if nonzero is None else ops._np(nonzero, np.uint32),
            ops._np(scale, np.uint16), ops._np(mean, np.uint16),
            None if signs is None else ops._np(signs), ops._np(down_full), ops._np(down_last))


def measure(out: int, n_in: int, levels: str, args) -> dict:
    W = torch.randn(out, n_in)
    base = sdq.SDQLinear.from_quantized(sdq.quantize_weight(W, sdq.SDQConfig(osr=OSR,
                                                                              levels=levels)))
    n = max(1, min(args.max_copies, math.ceil(2 * CACHE_BYTES / W.numel() / 4)))
    mods = [base] + [copy.deepcopy(base) for _ in range(n - 1)]
    weights = [W.clone() for _ in range(n)]
    xs = [torch.randn(1, n_in) for _ in range(2)]
    xn = [x.numpy() for x in xs]
    plans = [ops._layer_plan(m) for m in mods]
    views = [numpy_views(m) for m in mods]
    reps, calls = (3, max(n, 50)) if args.quick else (7, max(2 * n, 200))
    t = lambda fn: time_rotating(fn, n, reps, calls)  # noqa: E731
    row = {"out": out, "in": n_in, "levels": levels, "osr": OSR, "copies": n}
    with torch.no_grad():
        want = torch.from_numpy(plans[0].run(xn[0], args.threads))
        assert torch.equal(mods[0](xs[0]), want), "the module must compute what its plan does"
        row["module_us"] = t(lambda k: mods[k % n](xs[k & 1]))
        row["plan_us"] = t(lambda k: plans[k % n].run(xn[k & 1], args.threads))
        row["two_ops_us"] = t(lambda k: two_ops(mods[k % n], views[k % n], xn[k & 1]))
        row["linear_us"] = t(lambda k: F.linear(xs[k & 1], weights[k % n]))
        if not args.no_compile:
            compiled = torch.compile(lambda mod, x: mod(x))  # one graph serves every copy
            torch.testing.assert_close(compiled(mods[0], xs[0]), want, rtol=0, atol=0)
            row["compiled_us"] = t(lambda k: compiled(mods[k % n], xs[k & 1]))
        # The same on one thread in CPU time of the calling thread: what the Python around the
        # plan costs, unaffected by the neighbours' load (wall times on a busy machine are not).
        torch.set_num_threads(1)
        cpu = lambda fn: time_rotating(fn, n, reps, calls, clock=time.thread_time)  # noqa: E731
        row["module_cpu_1t_us"] = cpu(lambda k: mods[k % n](xs[k & 1]))
        row["plan_cpu_1t_us"] = cpu(lambda k: plans[k % n].run(xn[k & 1], 1))
        row["linear_cpu_1t_us"] = cpu(lambda k: F.linear(xs[k & 1], weights[k % n]))
        torch.set_num_threads(args.threads)
    row["overhead_cpu_1t_us"] = row["module_cpu_1t_us"] - row["plan_cpu_1t_us"]
    row["overhead_us"] = row["module_us"] - row["plan_us"]
    row["module_over_linear"] = row["module_us"] / row["linear_us"]
    row["two_ops_over_module"] = row["two_ops_us"] / row["module_us"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--threads", type=int, default=2, help="torch and sdq threads (default 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    p.add_argument("--max-copies", type=int, default=48,
                   help="at most this many copies of a layer to rotate over (default 48)")
    p.add_argument("--out", default="overhead.json",
                   help="result file (default bench/results/overhead.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for (out, n_in), levels in tqdm([(s, lv) for s in SHAPES for lv in LEVELS], desc="layers"):
        row = measure(out, n_in, levels, args)
        rows.append(row)
        tqdm.write(f"{out}x{n_in} {levels}: module {row['module_us']:.1f} us, plan "
                   f"{row['plan_us']:.1f}, two ops {row['two_ops_us']:.1f}, compiled "
                   f"{row.get('compiled_us', float('nan')):.1f}, F.linear "
                   f"{row['linear_us']:.1f} (module/linear {row['module_over_linear']:.2f}, "
                   f"overhead {row['overhead_us']:.1f} us); 1 thread, CPU time: module "
                   f"{row['module_cpu_1t_us']:.1f}, plan {row['plan_cpu_1t_us']:.1f}, F.linear "
                   f"{row['linear_cpu_1t_us']:.1f}")
    path = write_json(args.out, {"machine": machine(), "threads": args.threads,
                                 "kernel": core().addonly_kernel_name(), "batch": 1,
                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
