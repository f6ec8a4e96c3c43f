"""The C++ boundary: a failure inside the core becomes a Python exception, never a crash.

The core's noexcept entry points turn every exception (its own or a worker thread's) into a Status
(cpp/src/guard.h, parallel.h); the bindings map a Status to ValueError (bad arguments), MemoryError
(allocation failure) or RuntimeError (the rest). Worker-thread exceptions are provoked natively
(cpp/tests/test_boundary_native.cpp); here the allocation failure is provoked through a real
entry point, in a child process whose address space is capped, so a crash cannot take pytest down.

The CUDA binding's own checks (alignment, sizes, where a pointer points) are tested here as far as
the machine allows: without a GPU they must fail cleanly before any launch.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

core = pytest.importorskip("sdq._core")

# The layer of the child: in = 2^21, one token chunk of 16. Its inputs (xt: 128 MiB) fit under
# the cap; the add-only GEMM's look-up tables (16 bytes per code column and token: 512 MiB) do not.
_OOM_CHILD = textwrap.dedent("""
    import resource
    import numpy as np
    import sdq._core as core

    IN, BATCH, BS = 1 << 21, 16, 128
    lay = core.layout(IN, BS, 1.0)
    nb, words, cols = lay["num_blocks"], lay["words_per_row"], lay["total_code_cols"]
    sign = np.zeros((1, words), np.uint32)
    scale = np.zeros((1, nb), np.uint16)
    mean = np.zeros((1, nb), np.uint16)
    xt = np.ones((BATCH, cols), np.float32)
    xsum = np.zeros((BATCH, nb), np.float32)

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (256 << 20), hard))
    try:
        core.addonly_gemm(sign, None, scale, mean, xt, xsum, IN, BS, 1.0, threads=1)
        print("NO ERROR")
    except Exception as e:  # report the type and message to the parent
        print(type(e).__name__, "|", e)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    # The core is still usable after the failure.
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    core.fwht(x)
    print("FWHT", " ".join(f"{v:g}" for v in x[0]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_allocation_failure_is_memory_error_not_a_crash():
    out = subprocess.run([sys.executable, "-c", _OOM_CHILD], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"child crashed (rc {out.returncode}): {out.stderr[-2000:]}"
    lines = out.stdout.strip().splitlines()
    kind, _, message = lines[0].partition(" | ")
    assert kind == "MemoryError", lines[0]
    assert message.startswith("addonly_gemm: out of memory"), message
    assert "bad_alloc" in message  # the C++ exception's text is kept
    assert lines[1] == "FWHT 5 -1 -2 0"  # H [1,2,3,4] / 2: the core still works


def test_argument_errors_stay_value_errors():
    with pytest.raises(ValueError, match="codes must be in"):
        core.pack_bitplanes(np.array([[2]], np.int8), "binary")
    with pytest.raises(ValueError, match="power of two"):
        core.fwht(np.zeros((1, 3), np.float32))


# ----------------------------------------------------------------------------- CUDA binding

HAS_CUDA_BUILD = bool(core.has_cuda())
# Valid geometry and aligned addresses: only the device-memory check is left to fail.
_GEMM = dict(in_features=256, block_size=128, osr=2.0, levels="binary", out=4, batch=2)


def _gemm(sign=0x1000, scale=0x2000, mean=0x3000, xt=0x4000, xsum=0x5000, y=0x6000, **kw):
    args = {**_GEMM, **kw}
    core.cuda_addonly_gemm(sign, 0, scale, mean, xt, xsum, y, args["in_features"],
                           args["block_size"], args["osr"], args["levels"], args["out"],
                           args["batch"])


@pytest.mark.parametrize("name", ["scale", "mean"])
def test_cuda_gemm_rejects_misaligned_half_pointers(name):
    with pytest.raises(ValueError, match=f"{name}_ptr must be 2-byte aligned"):
        _gemm(**{name: 0x2001})


@pytest.mark.parametrize("name", ["xt", "xsum", "y"])
def test_cuda_gemm_rejects_misaligned_float_pointers(name):
    with pytest.raises(ValueError, match=f"{name}_ptr must be 4-byte aligned"):
        _gemm(**{name: 0x4002})


def test_cuda_activation_transform_rejects_misaligned_pointers():
    with pytest.raises(ValueError, match="down_last_ptr must be 4-byte aligned"):
        core.cuda_activation_transform(0x1000, 2, 300, 128, 1.5, 0, 0x2000, 0x3002, 0x4000,
                                       0x5000)
    with pytest.raises(ValueError, match="signs_ptr must be 4-byte aligned"):
        core.cuda_fwht(0x1000, 2, 16, 0x2001)


def test_cuda_sizes_that_overflow_are_value_errors():
    with pytest.raises(ValueError, match="too large"):
        _gemm(out=1 << 40, batch=1 << 40)
    with pytest.raises(ValueError, match="too large"):
        core.cuda_fwht(0x1000, 1 << 60, 1 << 10)


def _no_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA_BUILD and not _no_gpu(), reason="covered by the GPU tests below")
def test_cuda_pointer_check_without_a_gpu_is_a_clean_runtime_error():
    """No GPU (or no CUDA build): the pointer check itself fails, as RuntimeError naming the
    argument it was checking, before anything is launched."""
    match = "cannot check sign_ptr" if HAS_CUDA_BUILD else "built without CUDA"
    with pytest.raises(RuntimeError, match=match):
        _gemm()
    with pytest.raises(RuntimeError, match="cannot check x_ptr" if HAS_CUDA_BUILD else match):
        core.cuda_fwht(0x1000, 2, 16)


def _require_gpu():
    if not HAS_CUDA_BUILD:
        pytest.skip("sdq._core was built without CUDA kernels (no nvcc or SDQ_CUDA=OFF)")
    if _no_gpu():
        pytest.skip("no CUDA GPU visible to torch")


def test_cuda_host_memory_is_refused():
    _require_gpu()
    x = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="x_ptr .* is not CUDA memory"):
        core.cuda_fwht(x.ctypes.data, 2, 16)


def test_cuda_pinned_host_memory_is_refused():
    _require_gpu()
    import torch
    x = torch.zeros(2, 16).pin_memory()
    with pytest.raises(ValueError, match="x_ptr .* is pinned host memory"):
        core.cuda_fwht(x.data_ptr(), 2, 16)


def test_cuda_memory_of_another_device_is_refused():
    _require_gpu()
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.zeros(2, 16, device="cuda:1")
    with torch.cuda.device(0):
        with pytest.raises(ValueError, match="device 1, but the current device is 0"):
            core.cuda_fwht(x.data_ptr(), 2, 16, stream=torch.cuda.current_stream().cuda_stream)


def test_cuda_device_memory_is_accepted():
    _require_gpu()
    import torch
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device="cuda")
    core.cuda_fwht(x.data_ptr(), 1, 4, stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert x.cpu().tolist() == [[5.0, -1.0, -2.0, 0.0]]
