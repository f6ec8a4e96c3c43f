"""Data-free baselines: RTN, absmean ternary, sign with row scale, and their bit counts."""
import math

import pytest
import torch

from sdq.methods.baselines import absmean_ternary, bits_all_in, rtn, sign_rowscale


def _weights(rows=16, cols=300, seed=0):
    # 300 columns: two full groups of 128 and a short one of 44.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


def _fp16(x: float) -> float:
    return float(torch.tensor(x).half())


def _rtn_reference(W, bits, group_size):
    """One row-group at a time, in plain Python floats."""
    out = torch.empty(W.shape)
    maxq = 2 ** bits - 1
    for r in range(W.shape[0]):
        for s in range(0, W.shape[1], group_size):
            vals = [float(v) for v in W[r, s:s + group_size]]
            lo, hi = min(vals), max(vals)
            scale = _fp16((hi - lo) / maxq) if hi > lo else 1.0
            offset = _fp16(lo)
            for k, v in enumerate(vals):
                code = min(max(round((v - offset) / scale), 0), maxq)
                out[r, s + k] = code * scale + offset
    return out


def test_rtn_matches_hand_reference():
    W = _weights(rows=3, cols=21, seed=1)
    for bits in (2, 3):
        torch.testing.assert_close(rtn(W, bits, group_size=8), _rtn_reference(W, bits, 8),
                                   rtol=0, atol=1e-6)


def test_rtn_error_falls_with_bits():
    W = _weights()
    errors = [float((W - rtn(W, b)).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * float(W.pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_level_count_per_group(bits):
    W_hat = rtn(_weights(), bits)
    for row in W_hat:
        for start in range(0, row.numel(), 128):
            assert torch.unique(row[start:start + 128]).numel() <= 2 ** bits


def test_rtn_exact_on_grid():
    # Offsets and scales representable in fp16; every row-group uses codes 0 and maxq.
    bits, g = 3, 128
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2 ** bits, (4, 300), generator=gen).float()
    codes[:, 0::g] = 0
    codes[:, 1::g] = 2 ** bits - 1
    scale = torch.tensor([0.0625, 0.25, 0.5, 2.0])[:, None]
    offset = torch.tensor([-0.5, -1.0, 0.25, -3.0])[:, None]
    W = codes * scale + offset
    assert torch.equal(rtn(W, bits, g), W)


def test_rtn_constant_group_is_exact():
    W = torch.full((2, 10), 0.75)
    assert torch.equal(rtn(W, 2, group_size=4), W)


def test_rtn_accepts_half_input_returns_float32():
    W = _weights().half()
    W_hat = rtn(W, 4)
    assert W_hat.dtype == torch.float32
    torch.testing.assert_close(W_hat, rtn(W.float(), 4))


def test_absmean_ternary_by_hand():
    W = torch.tensor([[0.1, -0.4, 0.05, 0.9],
                      [-2.0, 2.0, 0.5, -0.4]])
    g0, g1 = _fp16(1.45 / 4), _fp16(4.9 / 4)
    expected = torch.tensor([[0.0, -g0, 0.0, g0],
                             [-g1, g1, 0.0, 0.0]])
    torch.testing.assert_close(absmean_ternary(W), expected, rtol=0, atol=1e-7)


def test_absmean_ternary_codes_and_scale():
    W = _weights()
    W_hat = absmean_ternary(W)
    gamma = torch.tensor([_fp16(sum(abs(float(v)) for v in row) / len(row)) for row in W])
    codes = W_hat / gamma[:, None]
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(codes, torch.clamp(torch.round(W / gamma[:, None]), -1, 1))


def test_absmean_ternary_zero_row_stays_zero():
    W = _weights(rows=3, cols=8)
    W[1] = 0
    W_hat = absmean_ternary(W)
    assert torch.isfinite(W_hat).all()
    assert torch.equal(W_hat[1], torch.zeros(8))


def test_sign_rowscale_by_hand():
    W = torch.tensor([[0.0, -2.0, 1.0, 3.0],
                      [-1.0, -1.0, -1.0, 0.5]])
    expected = torch.tensor([[1.5, -1.5, 1.5, 1.5],
                             [-0.875, -0.875, -0.875, 0.875]])
    assert torch.equal(sign_rowscale(W), expected)


def test_bits_all_in():
    assert bits_all_in("rtn", 4096, bits=4) == 4.25
    assert bits_all_in("gptq", 4096, bits=2, group_size=64) == 2.5
    assert math.isclose(bits_all_in("rtn", 300, bits=3), 3 + 96 / 300)  # 3 groups, one short
    assert bits_all_in("absmean_ternary", 4096) == 2 + 16 / 4096
    assert bits_all_in("sign_rowscale", 4096) == 1 + 16 / 4096
    with pytest.raises(ValueError, match="unknown method"):
        bits_all_in("nf4", 4096)
    with pytest.raises(ValueError, match="bits"):
        bits_all_in("rtn", 4096)
    with pytest.raises(ValueError, match="no parameters"):
        bits_all_in("sign_rowscale", 4096, bits=1)


@pytest.mark.parametrize("fn", [lambda W: rtn(W, 3), absmean_ternary, sign_rowscale])
def test_bad_weights_rejected(fn):
    W = _weights(rows=2, cols=8)
    for bad, match in [(W.clone().index_fill_(1, torch.tensor([3]), float("nan")), "NaN"),
                       (W.clone().index_fill_(1, torch.tensor([3]), float("inf")), "Inf"),
                       (W[0], "2-D"),
                       (W[:, :0], "empty")]:
        with pytest.raises(ValueError, match=match):
            fn(bad)
    with pytest.raises(TypeError, match="float"):
        fn(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="Tensor"):
        fn(W.numpy())


@pytest.mark.parametrize("bits", [1, 5, 16, 2.5, True])
def test_rtn_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        rtn(_weights(rows=2, cols=8), bits)


def test_rtn_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        rtn(_weights(rows=2, cols=8), 4, group_size=0)
