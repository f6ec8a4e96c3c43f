"""What the GPU benchmarks share: the check that there is something to measure, and CUDA
timers (calls cycle fn(0) ... fn(n - 1) over n layers' weights, more than the L2 holds, timed
by CUDA events)."""
from __future__ import annotations

import statistics
import sys

import torch


def cuda_ready(script: str) -> bool:
    """A visible GPU and a CUDA build of sdq._core; otherwise say which is missing on stderr."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU visible to torch; nothing to measure.", file=sys.stderr)
        return False
    import sdq._core as core
    if not core.has_cuda():
        print(f"{script}: sdq._core was built without CUDA kernels "
              "(build with tools/dev_build.sh cuda).", file=sys.stderr)
        return False
    return True


def _events_seconds(run, count: int, reps: int) -> float:
    """Median over reps of (time of run()) / count, by CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / count)
    return statistics.median(times)


def time_eager(fn, n: int, reps: int = 7, min_calls: int = 200) -> float:
    """Seconds per call of eager calls back to back: for short kernels, the host's launch rate."""
    calls = max(min_calls, n)
    for i in range(min(calls, 3 * n)):  # warm-up: module load, caches, clocks
        fn(i % n)
    torch.cuda.synchronize()

    def run():
        for i in range(calls):
            fn(i % n)
    return _events_seconds(run, calls, reps)


def time_graph(fn, n: int, reps: int = 7, replays: int = 10, min_calls: int = 32) -> float:
    """Seconds per call replaying one CUDA graph of max(n, min_calls) calls: the GPU's time
    alone. Raises RuntimeError when fn cannot be captured."""
    calls = max(n, min_calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for i in range(calls):
            fn(i % n)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n)
    g.replay()
    torch.cuda.synchronize()

    def run():
        for _ in range(replays):
            g.replay()
    return _events_seconds(run, replays * calls, reps)
