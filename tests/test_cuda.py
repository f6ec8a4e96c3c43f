"""CUDA kernels (cuda/*.cu) against the sdq.ref references, plus the host-side checks.

GPU tests need both a CUDA build of sdq._core and a visible GPU; each skip says which is missing.
The launch-plan, argument-validation and import tests run everywhere.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import sdq._core as core

torch = pytest.importorskip("torch")
from sdq import ref  # noqa: E402

HAS_CUDA_BUILD = bool(core.has_cuda())

KERNELS = ["auto", "table", "warp_rows", "tensor"]  # cuda_addonly_gemm's kernel= choices
H100_OPTIN = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 (227 KB)
A100_OPTIN = 166912  # on A100 (163 KB)


# ----------------------------------------------------------------------------- host side

def test_has_cuda_is_bool():
    assert isinstance(core.has_cuda(), bool)


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, sdq._core as c\n"
        "c.has_cuda(); c.cuda_gemm_plan(4096, 128, 1.0, 4096, 1, 132)\n"
        "print(torch.cuda.is_initialized())\n")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("in_features,osr", [(128, 1.0), (200, 1.5), (64, 2.0), (1000, 2.5),
                                             (4096, 1.0), (11008, 1.5), (8192, 16.0)])
@pytest.mark.parametrize("out", [1, 7, 255, 256, 257, 4096, 11008])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9, 16, 17, 200, 70000])
def test_gemm_plan_covers_everything(in_features, osr, out, batch):
    p = core.cuda_gemm_plan(in_features, 128, osr, out, batch, 132)
    lay = core.layout(in_features, 128, osr) if hasattr(core, "layout") else None
    if lay is not None:
        assert p["words"] == lay["words_per_row"]
    assert p["tokens"] in (1, 2, 4, 8, 16)
    assert p["tokens"] >= min(batch, 16)
    assert p["gemm_path"] == (batch > 8) == (p["tokens"] == 16)
    assert p["chunks"] * p["chunk_words"] >= p["words"] > (p["chunks"] - 1) * p["chunk_words"]
    assert p["row_tiles"] * p["threads"] >= out > (p["row_tiles"] - 1) * p["threads"]
    assert p["token_tiles"] * p["tokens"] >= batch > (p["token_tiles"] - 1) * p["tokens"]
    # every chunk belongs to exactly one split and no split is empty
    assert p["splits"] * p["chunks_per_split"] >= p["chunks"]
    assert (p["splits"] - 1) * p["chunks_per_split"] < p["chunks"]
    assert 1 <= p["splits"] <= 65535
    assert p["smem_bytes"] == p["tokens"] * p["chunk_words"] * 8 * 16 * 4
    assert p["smem_bytes"] <= 48 * 1024  # no opt-in needed


def test_gemm_plan_splits_only_small_grids():
    big = core.cuda_gemm_plan(4096, 128, 1.0, 4096, 1024, 132)
    assert big["splits"] == 1  # enough CTAs without splitting: plain stores, deterministic
    small = core.cuda_gemm_plan(4096, 128, 1.0, 4096, 1, 132)
    assert small["splits"] > 1
    assert small["row_tiles"] * small["splits"] >= 132


@pytest.mark.parametrize("block_size", [1, 2, 32, 64, 128, 256, 1024, 2048, 4096, 32768])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.5])
def test_activation_plan(block_size, osr):
    p = core.cuda_activation_transform_plan(3 * block_size + 1, block_size, osr, 5)
    padded = block_size
    fl = lambda n: n + n // 32  # noqa: E731
    assert p["smem_bytes"] == fl(p["tokens"] * padded) * 4
    assert p["tokens"] == (4 if fl(4 * padded) * 4 <= 48 * 1024 else 1)
    assert p["smem_bytes"] <= A100_OPTIN
    m = math.floor(padded * osr + 0.5)
    assert p["col_tiles"] * p["cols_per_cta"] >= -(-m // 32) * 32
    assert p["token_tiles"] * p["tokens"] >= 5


@pytest.mark.parametrize("optin", [H100_OPTIN, A100_OPTIN, 101376, 49152])
@pytest.mark.parametrize("log2n", list(range(0, 25)))
@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_fwht_plan(optin, log2n, rows):
    n = 1 << log2n
    p = core.cuda_fwht_plan(rows, n, optin)
    assert p["n1"] * p["n2"] == n
    assert p["smem_bytes_rows"] <= optin and p["smem_bytes_cols"] <= optin
    assert p["smem_bytes_rows"] == (p["rows_per_cta"] * p["n2"] * 33 // 32) * 4
    if optin >= H100_OPTIN - 1 and n <= 32768 or optin == A100_OPTIN and n <= 32768:
        assert not p["two_pass"]  # lengths up to 32768 in one pass on A100 / H100
    if p["two_pass"]:
        assert p["cols_per_cta"] >= 1 and p["n2"] % p["cols_per_cta"] == 0
        assert p["rows_per_cta"] == 1
    assert 1 <= p["rows_per_cta"] <= max(1, rows * p["n1"])


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="n must be a power of two"):
        core.cuda_fwht(0, 1, 12)
    with pytest.raises(ValueError, match="rows"):
        core.cuda_fwht(0, -1, 16)
    with pytest.raises(ValueError, match="x_ptr"):
        core.cuda_fwht(0, 2, 16)
    with pytest.raises(ValueError, match="block_size"):
        core.cuda_activation_transform(1, 1, 100, 96, 1.0, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="osr"):
        core.cuda_activation_transform(1, 1, 100, 64, 0.0, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="in_features"):
        core.cuda_activation_transform(1, 1, 0, 64, 1.0, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="down_full_ptr"):
        core.cuda_activation_transform(1, 1, 200, 128, 1.0, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="xsum_ptr"):
        core.cuda_activation_transform(1, 1, 100, 128, 1.0, 0, 0, 1, 1, 0)
    with pytest.raises(ValueError, match="levels"):
        core.cuda_addonly_gemm(4, 0, 1, 1, 1, 1, 1, 128, 128, 1.0, "quaternary", 1, 1)
    with pytest.raises(ValueError, match="nonzero_ptr"):
        core.cuda_addonly_gemm(4, 4, 1, 1, 1, 1, 1, 128, 128, 1.0, "binary", 1, 1)
    with pytest.raises(ValueError, match="nonzero_ptr"):
        core.cuda_addonly_gemm(4, 0, 1, 1, 1, 1, 1, 128, 128, 1.0, "ternary", 1, 1)
    with pytest.raises(ValueError, match="out"):
        core.cuda_addonly_gemm(4, 0, 1, 1, 1, 1, 1, 128, 128, 1.0, "binary", -1, 1)
    with pytest.raises(ValueError, match="y_ptr"):
        core.cuda_addonly_gemm(4, 0, 1, 1, 1, 1, 0, 128, 128, 1.0, "binary", 1, 1)
    with pytest.raises(ValueError, match="aligned"):
        core.cuda_addonly_gemm(6, 0, 1, 1, 1, 1, 1, 128, 128, 1.0, "binary", 1, 1)


def test_empty_calls_need_no_gpu():
    if HAS_CUDA_BUILD:
        core.cuda_fwht(0, 0, 1024)  # rows == 0: nothing to do, no device query
        core.cuda_addonly_gemm(0, 0, 0, 0, 0, 0, 0, 128, 128, 1.0, "binary", 0, 5)
        core.cuda_activation_transform(0, 0, 100, 128, 1.0, 0, 0, 0, 0, 0)
    else:
        with pytest.raises(RuntimeError, match="not in this build"):
            core.cuda_fwht(0, 0, 1024)


@pytest.mark.skipif(HAS_CUDA_BUILD, reason="checks the CPU-only build's stubs")
def test_cpu_only_build_raises_runtime_error():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        core.cuda_addonly_gemm(4, 0, 4, 4, 4, 4, 4, 128, 128, 1.0, "binary", 1, 1)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        core.cuda_activation_transform(4, 1, 100, 128, 1.0, 0, 0, 4, 4, 4)


# ----------------------------------------------------------------------------- GPU

def _stream():
    return torch.cuda.current_stream().cuda_stream


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _relerr(out, expect) -> float:
    out = torch.as_tensor(out, dtype=torch.float64).cpu()
    expect = torch.as_tensor(expect, dtype=torch.float64).cpu()
    assert torch.isfinite(out).all(), "non-finite output (unwritten element?)"
    return float((out - expect).norm() / expect.norm().clamp_min(1e-30))


@pytest.mark.parametrize("log2n", list(range(0, 16)))
@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_fwht_matches_sylvester(log2n, rows, signed, inverse):
    _require_gpu()
    n = 1 << log2n
    g = torch.Generator().manual_seed(1000 * log2n + rows)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double() if signed else torch.ones(n).double()
    if n <= 4096:
        H = _sylvester(n)
        expect = (x * s) @ H.T / math.sqrt(n) if not inverse else (x @ H.T / math.sqrt(n)) * s
    else:  # dense H too large: use the float64 CPU reference of sdq.ref
        expect = torch.from_numpy(ref.fwht_ref(x.numpy(), s.numpy() if signed else None, inverse))
    xd = x.float().cuda()
    sd = s.float().cuda()
    core.cuda_fwht(xd.data_ptr(), rows, n, sd.data_ptr() if signed else 0, inverse, _stream())
    torch.cuda.synchronize()
    assert _relerr(xd, expect) < 2e-6 * max(1, log2n)


@pytest.mark.parametrize("log2n", [16, 17, 20])
def test_fwht_two_pass_lengths_and_round_trip(log2n):
    _require_gpu()
    n, rows = 1 << log2n, 3
    g = torch.Generator().manual_seed(log2n)
    x = torch.randn(rows, n, generator=g)
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    expect = torch.from_numpy(ref.fwht_ref(x.double().numpy(), s.double().numpy(), False))
    xd, sd = x.cuda(), s.cuda()
    core.cuda_fwht(xd.data_ptr(), rows, n, sd.data_ptr(), False, _stream())
    torch.cuda.synchronize()
    assert _relerr(xd, expect) < 5e-5
    core.cuda_fwht(xd.data_ptr(), rows, n, sd.data_ptr(), True, _stream())
    torch.cuda.synchronize()
    assert _relerr(xd, x) < 5e-5


@pytest.mark.parametrize("n", [1, 2, 64, 128, 4096, 32768])
def test_fwht_round_trip_odd_rows(n):
    _require_gpu()
    x = torch.randn(5, n)
    s = (torch.randint(0, 2, (n,)) * 2 - 1).float()
    xd, sd = x.cuda(), s.cuda()
    core.cuda_fwht(xd.data_ptr(), 5, n, sd.data_ptr(), False, _stream())
    core.cuda_fwht(xd.data_ptr(), 5, n, sd.data_ptr(), True, _stream())
    torch.cuda.synchronize()
    assert _relerr(xd, x) < 1e-5


def _rounds_to_bf16(kernel) -> bool:
    """The tensor kernel multiplies bf16-rounded xt ('auto' is the table kernel)."""
    return kernel == "tensor"


def _kernel_xt(xt, kernel):
    """xt as the kernel multiplies it: rounded to bf16 (nearest even) for the tensor kernel; its
    products are exact and its sums fp32, so it must then equal the float reference."""
    if not _rounds_to_bf16(kernel):
        return xt
    return torch.from_numpy(xt).bfloat16().float().numpy()


def _require_kernel(kernel):
    _require_gpu()
    if kernel == "tensor" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor kernel needs compute capability 8.0")


def _require_gpu():
    if not HAS_CUDA_BUILD:
        pytest.skip("sdq._core was built without CUDA kernels (no nvcc or SDQ_CUDA=OFF)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")


def _geometry(in_features, block_size, osr):
    blocks, total = ref.block_geometry(in_features, block_size, osr)
    return blocks, total


@pytest.mark.parametrize("in_features", [128, 200, 64, 1000, 4096])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("batch", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("hadamard", [True, False])
def test_activation_transform_matches_ref(in_features, osr, batch, hadamard):
    _require_gpu()
    bs = 128
    blocks, total = _geometry(in_features, bs, osr)
    rng = np.random.default_rng(in_features * 7 + batch)
    x = rng.standard_normal((batch, in_features)).astype(np.float32)
    signs = (rng.integers(0, 2, bs) * 2 - 1).astype(np.float32) if hadamard else None
    p0, m0 = blocks[0][2], blocks[0][3]
    pl, ml = blocks[-1][2], blocks[-1][3]
    down_full = rng.standard_normal((p0, m0)).astype(np.float32) / math.sqrt(p0)
    down_last = rng.standard_normal((pl, ml)).astype(np.float32) / math.sqrt(pl)
    xt_ref, xsum_ref = ref.activation_transform_ref(x, bs, osr, signs, down_full, down_last)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    xd, dfd, dld = dev(x), dev(down_full), dev(down_last)
    sd = dev(signs) if hadamard else None
    xt = torch.full((batch, total), float("nan"), device="cuda")
    xsum = torch.full((batch, len(blocks)), float("nan"), device="cuda")
    core.cuda_activation_transform(xd.data_ptr(), batch, in_features, bs, osr,
                                   sd.data_ptr() if hadamard else 0, dfd.data_ptr(),
                                   dld.data_ptr(), xt.data_ptr(), xsum.data_ptr(), _stream())
    torch.cuda.synchronize()
    assert _relerr(xt, xt_ref) < 1e-5
    assert _relerr(xsum, xsum_ref) < 1e-5
    # padding code columns are exact zeros
    for (_, _, _, m, off), nxt in zip(blocks, [b[4] for b in blocks[1:]] + [total]):
        assert torch.all(xt[:, off + m:nxt] == 0)


def _random_layer(rng, out, in_features, bs, osr, levels):
    blocks, total = _geometry(in_features, bs, osr)
    valid = np.zeros(total, dtype=bool)
    for (_, _, _, m, off) in blocks:
        valid[off:off + m] = True
    sign_bits = rng.integers(0, 2, (out, total)) * valid
    if levels == "ternary":
        nz_bits = rng.integers(0, 2, (out, total)) * valid
        sign_bits = sign_bits * nz_bits  # the sign bit of a zero code is 0
        nonzero = ref.pack_plane_ref(nz_bits)
    else:
        nonzero = None
    sign = ref.pack_plane_ref(sign_bits)
    nb = len(blocks)
    scale = (rng.uniform(0.5, 2.0, (out, nb))).astype(np.float16).view(np.uint16)
    mean = (rng.standard_normal((out, nb)) * 0.1).astype(np.float16).view(np.uint16)
    return blocks, total, sign, nonzero, scale, mean


def _as_i32(a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int32)).cuda()


@pytest.mark.parametrize("in_features", [128, 200, 64, 1000])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("batch,out", [(1, 4096), (1, 7), (3, 1), (3, 4096), (16, 7),
                                       (16, 4096), (64, 7), (64, 1), (200, 4096), (200, 7)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_addonly_gemm_matches_ref(in_features, osr, levels, batch, out, kernel):
    _require_kernel(kernel)
    bs = 128
    rng = np.random.default_rng(in_features + 31 * batch + out)
    layer = _random_layer(rng, out, in_features, bs, osr, levels)
    xt, xsum = _layer_inputs(rng, layer[0], layer[1], batch)
    expect = ref.addonly_gemm_ref(*layer[2:], _kernel_xt(xt, kernel), xsum, in_features, bs, osr)
    y = _gemm_on_gpu(layer, xt, xsum, in_features, bs, osr, levels, kernel)
    assert _relerr(y, expect) < 1e-5


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_addonly_gemm_unaligned_rows(levels, kernel):
    """Rows whose word count is odd (in=200, OSR 1.5 -> 12 words; in=64, OSR 1.5 -> 3 words) and
    a base pointer that is only 4-byte aligned take the scalar-load path."""
    _require_kernel(kernel)
    rng = np.random.default_rng(5)
    for in_features, osr in [(64, 1.5), (200, 1.5), (1000, 1.0)]:
        out, batch, bs = 300, 5, 128
        blocks, total, sign, nonzero, scale, mean = _random_layer(rng, out, in_features, bs, osr,
                                                                  levels)
        xt, xsum = _layer_inputs(rng, blocks, total, batch)
        expect = ref.addonly_gemm_ref(sign, nonzero, scale, mean, _kernel_xt(xt, kernel), xsum,
                                      in_features, bs, osr)
        # offset every plane by one word inside a larger buffer
        def shifted(a):
            buf = torch.zeros(a.size + 1, dtype=torch.int32, device="cuda")
            buf[1:] = _as_i32(a).flatten()
            return buf, buf.data_ptr() + 4
        sbuf, sp = shifted(sign)
        nbuf, np_ = shifted(nonzero) if nonzero is not None else (None, 0)
        scd = torch.from_numpy(scale.view(np.int16)).cuda()
        mud = torch.from_numpy(mean.view(np.int16)).cuda()
        xtd, xsd = torch.from_numpy(xt).cuda(), torch.from_numpy(xsum).cuda()
        y = torch.full((batch, out), float("nan"), device="cuda")
        core.cuda_addonly_gemm(sp, np_, scd.data_ptr(), mud.data_ptr(), xtd.data_ptr(),
                               xsd.data_ptr(), y.data_ptr(), in_features, bs, osr, levels, out,
                               batch, _stream(), kernel=kernel)
        torch.cuda.synchronize()
        assert _relerr(y, expect) < 1e-5, (in_features, osr)


def _gemm_on_gpu(layer, xt, xsum, in_features, bs, osr, levels, kernel, xt_offset=0):
    """y from cuda_addonly_gemm; xt_offset > 0 places xt that many floats into a larger buffer
    (a pointer that is 4-byte but not 16-byte aligned)."""
    _, _, sign, nonzero, scale, mean = layer
    batch, out = xt.shape[0], sign.shape[0]
    sd = _as_i32(sign)
    nd = _as_i32(nonzero) if nonzero is not None else None
    scd = torch.from_numpy(scale.view(np.int16)).cuda()
    mud = torch.from_numpy(mean.view(np.int16)).cuda()
    buf = torch.zeros(xt.size + xt_offset, device="cuda")
    buf[xt_offset:] = torch.from_numpy(xt).cuda().flatten()
    xsd = torch.from_numpy(xsum).cuda()
    y = torch.full((batch, out), float("nan"), device="cuda")
    core.cuda_addonly_gemm(sd.data_ptr(), nd.data_ptr() if nd is not None else 0, scd.data_ptr(),
                           mud.data_ptr(), buf.data_ptr() + 4 * xt_offset, xsd.data_ptr(),
                           y.data_ptr(), in_features, bs, osr, levels, out, batch, _stream(),
                           kernel=kernel)
    torch.cuda.synchronize()
    return y


def _layer_inputs(rng, blocks, total, batch):
    """Random xt (zeros in each block's padding columns, as the activation transform writes) and
    xsum."""
    xt = rng.standard_normal((batch, total)).astype(np.float32)
    for (_, _, _, m, off), nxt in zip(blocks, [b[4] for b in blocks[1:]] + [total]):
        xt[:, off + m:nxt] = 0.0
    return xt, rng.standard_normal((batch, len(blocks))).astype(np.float32)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("in_features,osr", [(4096, 2.5), (2176, 1.0), (8192, 1.0)])
@pytest.mark.parametrize("batch,out", [(1, 37), (2, 16), (5, 9), (4, 129), (8, 17), (9, 16),
                                       (16, 33), (17, 15), (40, 100)])
@pytest.mark.parametrize("kernel", ["warp_rows", "tensor"])
def test_long_rows(levels, in_features, osr, batch, out, kernel):
    """Rows of many 32-word segments (warp_rows: several per warp) and many blocks (tensor: several
    per warp, 10-word blocks taking a full and a partial step), a last row tile that is partly past
    `out`, and batches that take several token tiles (tensor: one or two n tiles per CTA)."""
    _require_kernel(kernel)
    if kernel == "warp_rows" and batch > 5:
        pytest.skip("warp_rows: token tiles are covered by batch 5")
    rng = np.random.default_rng(in_features + batch * 7 + out)
    layer = _random_layer(rng, out, in_features, 128, osr, levels)
    xt, xsum = _layer_inputs(rng, layer[0], layer[1], batch)
    expect = ref.addonly_gemm_ref(*layer[2:], _kernel_xt(xt, kernel), xsum, in_features, 128, osr)
    y = _gemm_on_gpu(layer, xt, xsum, in_features, 128, osr, levels, kernel)
    assert _relerr(y, expect) < 1e-5


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gemm_adversarial_inputs(levels, kernel):
    """All-zero code rows, activations of 1e30 and denormals, an xt pointer that is not 16-byte
    aligned: every kernel equals the reference."""
    _require_kernel(kernel)
    rng = np.random.default_rng(3)
    in_features, osr, out, batch = 1000, 1.5, 70, 3
    layer = list(_random_layer(rng, out, in_features, 128, osr, levels))
    layer[2][::5] = 0  # all-zero sign rows (binary: all -1; ternary: no +1)
    if layer[3] is not None:
        layer[3][1::7] = 0  # ternary: rows of zero codes
        layer[2][1::7] = 0
    xt, xsum = _layer_inputs(rng, layer[0], layer[1], batch)
    xt[0] *= 1e30
    xt[1] *= 1e-39  # denormal
    expect = ref.addonly_gemm_ref(*layer[2:], _kernel_xt(xt, kernel), xsum, in_features, 128, osr)
    y = _gemm_on_gpu(layer, xt, xsum, in_features, 128, osr, levels, kernel, xt_offset=1)
    assert torch.isfinite(y).all()
    for t in range(batch):  # per token: their magnitudes differ by 69 orders
        scale = np.abs(expect[t]).max() + np.abs(xsum[t]).max()
        assert torch.allclose(y[t].cpu().double(), torch.from_numpy(expect[t]).double(),
                              rtol=1e-5, atol=1e-5 * scale), t


@pytest.mark.parametrize("in_features,osr", [(64, 1.0), (1000, 2.5), (8192, 2.0), (11008, 1.5)])
@pytest.mark.parametrize("out", [1, 15, 255, 256, 257, 8192])
@pytest.mark.parametrize("batch", [1, 8, 9, 16, 17, 70000])
def test_tensor_rows_plan_covers_everything(in_features, osr, out, batch):
    p = core.cuda_tensor_rows_plan(in_features, 128, osr, out, batch, 132)
    nb = core.layout(in_features, 128, osr)["num_blocks"]
    assert p["tokens"] == (8 if batch <= 8 else 16)
    rows = p["rows_per_cta"]
    assert rows % 16 == 0
    assert p["row_tiles"] * rows >= out > (p["row_tiles"] - 1) * rows
    assert p["token_tiles"] * p["tokens"] >= batch > (p["token_tiles"] - 1) * p["tokens"]
    # every block in exactly one split, none empty; splits only where the grid is small
    assert p["splits"] * p["blocks_per_split"] >= nb > (p["splits"] - 1) * p["blocks_per_split"]
    assert 1 <= p["splits"] <= nb
    if p["row_tiles"] * p["token_tiles"] >= 2 * 132:
        assert p["splits"] == 1


def test_tensor_kernel_rounds_to_bf16_and_no_further():
    """Activations that bf16 rounds (1 + 2^-9 down to 1, 1 + 3 * 2^-9 up to 1 + 2^-7) against one
    all-+1 row: the tensor kernel gives the bf16 sums exactly, the table kernel the float ones."""
    _require_gpu()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor kernel needs compute capability 8.0")
    in_features, bs, osr = 128, 128, 1.0
    blocks, total = _geometry(in_features, bs, osr)
    sign = ref.pack_plane_ref(np.ones((1, total), dtype=np.int64))
    scale = np.ones((1, 1), dtype=np.float16).view(np.uint16)
    mean = np.zeros((1, 1), dtype=np.float16).view(np.uint16)
    layer = (blocks, total, sign, None, scale, mean)
    xt = np.zeros((2, total), dtype=np.float32)
    xt[0, :] = 1 + 2.0 ** -9
    xt[1, :] = 1 + 3 * 2.0 ** -9
    xsum = np.zeros((2, 1), dtype=np.float32)
    got = _gemm_on_gpu(layer, xt, xsum, in_features, bs, osr, "binary", "tensor").cpu()
    assert got[0, 0].item() == total * 1.0
    assert got[1, 0].item() == total * (1 + 2.0 ** -7)
    exact = _gemm_on_gpu(layer, xt, xsum, in_features, bs, osr, "binary", "table").cpu()
    assert abs(exact[0, 0].item() - total * (1 + 2.0 ** -9)) < 1e-3


def test_kernel_name_is_checked():
    with pytest.raises(ValueError, match="kernel must be"):
        core.cuda_addonly_gemm(0, 0, 0, 0, 0, 0, 0, 128, 128, 1.0, "binary", 0, 1, kernel="fast")


@pytest.mark.parametrize("in_features,osr", [(64, 1.0), (1000, 2.5), (4096, 1.0), (8192, 2.0)])
@pytest.mark.parametrize("out", [1, 15, 16, 17, 4096])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9])
def test_warp_rows_plan_covers_everything(in_features, osr, out, batch):
    p = core.cuda_warp_rows_plan(in_features, 128, osr, out, batch)
    words = core.layout(in_features, 128, osr)["words_per_row"]
    assert p["segments"] * 32 >= words > (p["segments"] - 1) * 32
    assert 1 <= p["warps_per_cta"] <= min(8, p["segments"])
    assert p["tokens"] * p["rows_per_warp"] == 16
    assert p["tokens"] >= min(batch, 4)
    assert p["row_tiles"] * p["rows_per_warp"] >= out > (p["row_tiles"] - 1) * p["rows_per_warp"]
    assert p["token_tiles"] * p["tokens"] >= batch > (p["token_tiles"] - 1) * p["tokens"]


def test_end_to_end_matches_dense_layer():
    """activation_transform + addonly_gemm on the GPU equal the CPU kernels of the same layer."""
    _require_gpu()
    if not hasattr(core, "addonly_gemm"):
        pytest.skip("CPU add-only kernels not in this build yet")
    rng = np.random.default_rng(11)
    in_features, bs, osr, out, batch, levels = 1000, 128, 2.0, 513, 7, "ternary"
    blocks, total, sign, nonzero, scale, mean = _random_layer(rng, out, in_features, bs, osr, levels)
    (p0, m0), (pl, ml) = blocks[0][2:4], blocks[-1][2:4]
    down_full = np.asarray(core.resample_matrix(m0, p0), dtype=np.float32)
    down_last = np.asarray(core.resample_matrix(ml, pl), dtype=np.float32)
    signs = (rng.integers(0, 2, bs) * 2 - 1).astype(np.float32)
    x = rng.standard_normal((batch, in_features)).astype(np.float32)
    xt_cpu, xsum_cpu = core.activation_transform(x, bs, osr, signs, down_full, down_last)
    y_cpu = core.addonly_gemm(sign, nonzero, scale, mean, xt_cpu, xsum_cpu, in_features, bs, osr)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    xt = torch.empty((batch, total), device="cuda")
    xsum = torch.empty((batch, len(blocks)), device="cuda")
    xd, sgd, dfd, dld = dev(x), dev(signs), dev(down_full), dev(down_last)
    core.cuda_activation_transform(xd.data_ptr(), batch, in_features, bs, osr, sgd.data_ptr(),
                                   dfd.data_ptr(), dld.data_ptr(), xt.data_ptr(), xsum.data_ptr(),
                                   _stream())
    sd, nd = _as_i32(sign), _as_i32(nonzero)
    scd = torch.from_numpy(scale.view(np.int16)).cuda()
    mud = torch.from_numpy(mean.view(np.int16)).cuda()
    # the float kernels: the CPU's sums; the tensor kernel (bf16 xt): within bf16 rounding
    kernels = [("auto", 1e-4), ("tensor", 4e-3)]
    if torch.cuda.get_device_capability()[0] < 8:
        kernels = kernels[:1]
    for kernel, tol in kernels:
        y = torch.empty((batch, out), device="cuda")
        core.cuda_addonly_gemm(sd.data_ptr(), nd.data_ptr(), scd.data_ptr(), mud.data_ptr(),
                               xt.data_ptr(), xsum.data_ptr(), y.data_ptr(), in_features, bs, osr,
                               levels, out, batch, _stream(), kernel=kernel)
        torch.cuda.synchronize()
        assert _relerr(y, y_cpu) < tol, kernel
