"""The core's thread backends (sdq/threads.h: its persistent pool, or the caller's OpenMP team) seen
through the add-only kernels.

A thread count only changes how rows, tokens and blocks are split, never the arithmetic of one
output, so every thread count must give bit-identical results. The layers below are large enough
that threads > 1 really splits the work (a chunk must hold about 32k code words of the GEMM or
2^18 multiply-adds of the transform; smaller work runs inline), and small ones take the inline path.
An exception inside a worker chunk is provoked natively (cpp/tests/test_boundary_native.cpp,
test_thread_pool_native.cpp); here the pool is checked under an address-space cap in a child process.
"""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sdq.ref.kernels import block_geometry

core = pytest.importorskip("sdq._core")
if not hasattr(core, "addonly_gemm"):
    pytest.skip("sdq._core was built without the CPU add-only kernels", allow_module_level=True)

KERNELS = core.addonly_kernels()
BS = 128


def _problem(seed, out, in_features, osr, batch, ternary):
    """Random activations, transform tables and packed weights of one layer."""
    rng = np.random.default_rng(seed)
    lay = core.layout(in_features, BS, osr)
    nb, words = lay["num_blocks"], lay["words_per_row"]
    blocks, _ = block_geometry(in_features, BS, osr)  # (.., .., padded, m, ..) per block
    return dict(
        x=rng.standard_normal((batch, in_features)).astype(np.float32),
        signs=rng.choice([-1.0, 1.0], BS).astype(np.float32),
        down_full=rng.standard_normal(blocks[0][2:4]).astype(np.float32),
        down_last=rng.standard_normal(blocks[-1][2:4]).astype(np.float32),
        sign=rng.integers(0, 1 << 32, (out, words), dtype=np.uint32),
        nonzero=rng.integers(0, 1 << 32, (out, words), dtype=np.uint32) if ternary else None,
        scale=rng.uniform(0.01, 2.0, (out, nb)).astype(np.float16).view(np.uint16),
        mean=(0.1 * rng.standard_normal((out, nb))).astype(np.float16).view(np.uint16),
        in_features=in_features, osr=osr)


def _run(p, threads, kernel="auto"):
    xt, xsum = core.activation_transform(p["x"], BS, p["osr"], p["signs"], p["down_full"],
                                         p["down_last"], threads=threads)
    y = core.addonly_gemm(p["sign"], p["nonzero"], p["scale"], p["mean"], xt, xsum,
                          p["in_features"], BS, p["osr"], threads=threads, kernel=kernel)
    return xt, xsum, y


# (out, in, osr, batch, ternary): split by rows, by tokens and blocks, and inline (tiny).
SHAPES = [(1000, 1024, 2.0, 1, False), (600, 1000, 1.5, 20, True), (2048, 2048, 2.0, 3, False),
          (37, 300, 1.0, 5, True), (5, 64, 2.0, 1, False)]


BACKENDS = ["pool"] + (["openmp"] if core.openmp_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test on each thread backend (sdq.threads), restoring the one before."""
    before = core.thread_backend()
    core.set_thread_backend(request.param)
    yield request.param
    core.set_thread_backend(before)


@pytest.mark.parametrize("kernel", KERNELS)
def test_thread_counts_give_identical_results(kernel, backend):
    for i, shape in enumerate(SHAPES):
        p = _problem(i, *shape)
        want = _run(p, 1, kernel)
        for threads in (2, 3, 8):
            got = _run(p, threads, kernel)
            for name, w, g in zip(("xt", "xsum", "y"), want, got):
                assert np.array_equal(w, g), (shape, threads, name)


def test_many_python_threads_at_once(backend):
    problems = [_problem(10 + i, 700 + 16 * i, 1024, 2.0, 1 + i % 4, i % 2 == 1)
                for i in range(6)]
    want = [_run(p, 1)[2] for p in problems]

    def worker(k):
        for rep in range(8):
            i = (k + rep) % len(problems)
            if not np.array_equal(_run(problems[i], 2 + rep % 3)[2], want[i]):
                return f"thread {k}, repetition {rep}, problem {i}"
        return None

    with ThreadPoolExecutor(max_workers=8) as ex:  # the kernels release the GIL
        errors = [e for e in ex.map(worker, range(16)) if e is not None]
    assert errors == []


def _child_run(p, want, queue):
    # a child of fork() is back on the pool: the parent's OpenMP team does not exist there
    queue.put(core.thread_backend() == "pool" and bool(np.array_equal(_run(p, 2)[2], want)))


def test_forked_child_uses_the_kernels(backend):
    p = _problem(99, 1500, 1024, 2.0, 2, True)
    want = _run(p, 2)[2]  # the parent's pool (or OpenMP team) now has workers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_run, args=(p, want, queue))
    child.start()
    child.join(timeout=120)
    if child.is_alive():  # a deadlock on the parent's pool
        child.kill()
        child.join()
        pytest.fail("the forked child hung running the kernels")
    assert child.exitcode == 0
    assert queue.get(timeout=10) is True


# Under a capped address space: (1) with a warm pool, tables beyond the cap raise MemoryError and
# the pool keeps working; (2) with no pool yet and almost no room, workers cannot start (their
# stacks do not fit), and the call still runs correctly on the caller alone.
_CAPPED_CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import sdq._core as core
    core.set_thread_backend("pool")  # the pool's own failure path (libgomp would end the process)

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    def gemm(inf, batch, threads, out=512):
        lay = core.layout(inf, 128, 1.0)
        nb, words, cols = lay["num_blocks"], lay["words_per_row"], lay["total_code_cols"]
        rng = np.random.default_rng(0)
        sign = rng.integers(0, 1 << 32, (out, words), dtype=np.uint32)
        scale = np.full((out, nb), 0x3C00, np.uint16)  # fp16 1.0
        mean = np.zeros((out, nb), np.uint16)
        xt = rng.standard_normal((batch, cols)).astype(np.float32)
        xsum = np.zeros((batch, nb), np.float32)
        return core.addonly_gemm(sign, None, scale, mean, xt, xsum, inf, 128, 1.0,
                                 threads=threads)

    def threads_now():
        return int(next(l for l in open("/proc/self/status") if l.startswith("Threads:")).split()[1])

    mode = sys.argv[1]
    want = gemm(4096, 4, 1)
    before = threads_now()
    if mode == "warm":
        gemm(4096, 4, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    room = (1 << 20) if mode == "cold" else (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + room, hard))
    if mode == "warm":
        try:
            gemm(1 << 20, 16, 2, out=2)  # inputs 64 MiB; tables: 1 GiB
            print("NO ERROR")
        except MemoryError as e:
            print("MemoryError", "bad_alloc" in str(e), "|", e)
    print("SAME", np.array_equal(gemm(4096, 4, 2), want))
    print("STARTED", threads_now() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_pool_under_an_address_space_cap(mode):
    out = subprocess.run([sys.executable, "-c", _CAPPED_CHILD, mode], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"child crashed (rc {out.returncode}): {out.stderr[-2000:]}"
    lines = out.stdout.split("\n")
    if mode == "warm":
        assert lines[0].startswith("MemoryError True | addonly_gemm: out of memory"), lines
    assert "SAME True" in lines, lines
    if mode == "cold":  # the failure path really ran: no worker could start
        assert "STARTED 0" in lines, lines


# The pool's workers poll ~100 us for the next job before they sleep; the tests above call the
# kernels back to back, so they mostly meet spinning workers. Here the sleeping path: with
# SDQ_POOL_SPIN_US=0 nobody spins, and with the default the calls come 5 ms apart (workers
# asleep by then). Both in a child, since the setting is read once per process.
_SLEEP_PATH_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_thread_pool import SHAPES, _problem, _run
    pause = float(sys.argv[2])
    bad = 0
    for rep in range(3):
        for i, shape in enumerate(SHAPES):
            p = _problem(i, *shape)
            want = _run(p, 1)
            for threads in (2, 3):
                time.sleep(pause)
                got = _run(p, threads)
                bad += not all(np.array_equal(w, g) for w, g in zip(want, got))
    print("BAD", bad)
""")


@pytest.mark.parametrize("spin_us, pause", [("0", 0.0), (None, 0.005)])
def test_sleeping_workers_wake_for_the_next_job(spin_us, pause):
    import os
    env = dict(os.environ)
    env.pop("SDQ_POOL_SPIN_US", None)
    if spin_us is not None:
        env["SDQ_POOL_SPIN_US"] = spin_us
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _SLEEP_PATH_CHILD, tests, str(pause)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD 0" in out.stdout.split("\n"), out.stdout


# The default backend of the Python package's first use of the core (sdq.threads), in a fresh
# process each: "openmp" where this build has it and torch's ATen backend is OpenMP, else
# "pool"; $SDQ_THREAD_BACKEND overrides it and a bad value is a clear error.
_DEFAULT_CHILD = "import sdq; from sdq._native import core; print(core().thread_backend())"


@pytest.mark.parametrize("env_value", [None, "pool", "openmp", "fast"])
def test_default_backend_and_its_override(env_value):
    import os
    import torch
    env = {k: v for k, v in os.environ.items() if k != "SDQ_THREAD_BACKEND"}
    if env_value is not None:
        env["SDQ_THREAD_BACKEND"] = env_value
    out = subprocess.run([sys.executable, "-c", _DEFAULT_CHILD], capture_output=True, text=True,
                         timeout=120, env=env)
    if env_value == "fast":
        assert out.returncode != 0 and "SDQ_THREAD_BACKEND must be one of" in out.stderr
        return
    if env_value == "openmp" and not core.openmp_available():
        assert out.returncode != 0 and "no OpenMP thread backend" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-2000:]
    torch_omp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    want = env_value or ("openmp" if core.openmp_available() and torch_omp else "pool")
    assert out.stdout.split() == [want]


def test_set_thread_backend_checks_its_argument():
    import sdq
    before = sdq.thread_backend()
    with pytest.raises(ValueError, match="one of"):
        sdq.set_thread_backend("threads")
    assert sdq.thread_backend() == before
    sdq.set_thread_backend("pool")
    assert sdq.thread_backend() == "pool"
    sdq.set_thread_backend(before)
