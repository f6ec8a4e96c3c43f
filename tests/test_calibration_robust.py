"""Calibration with dead and rank-deficient Hessians: every calibrated path succeeds, stores only
finite scales and means, says what it had to do (one CalibrationWarning per layer, none for a
healthy Hessian) and still beats the data-free quantizer on the calibration inputs."""
import contextlib
import functools
import re
import warnings

import numpy as np
import pytest
import torch

import sdq
from sdq import blocks
from sdq.calibration_warnings import CalibrationWarning
from sdq.gptq import gptq_quantize
from sdq.methods import BaselineConfig, quantize_linear
from sdq.methods.baselines import rtn
from sdq.methods.gram import gram_codes, refit_scale_mean
from sdq.methods.sdq import _Assembler

OUT, IN, BLOCK = 64, 256, 128
LAYER = "layer 7 mlp.down_proj"

_gen = torch.Generator().manual_seed(0)
W = torch.randn(OUT, IN, generator=_gen)
# Correlated inputs with a decaying spectrum, like real layer inputs.
MIX = torch.randn(IN, IN, generator=_gen) * (torch.arange(IN) + 1.0) ** -0.7


def _inputs(n_tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = (MIX @ torch.randn(IN, n_tokens, generator=g)).T
    return X + 0.1 * torch.randn(n_tokens, IN, generator=g)


def _dead_block():
    X = _inputs(1024)
    X[:, BLOCK:] = 0  # the second block of inputs never fires
    return X


def _dead_columns():
    X = _inputs(1024)
    X[:, [3, 77, 200]] = 0
    return X


def _rank_one():
    g = torch.Generator().manual_seed(2)
    return torch.randn(64, 1, generator=g) @ torch.randn(1, IN, generator=g)


DEAD_BLOCK_1 = r"no calibration data.*\(block 1\)"
# name -> (calibration inputs X [n, in], the warning expected from gram codes, from the rest).
# Dead columns inside a live block follow GPTQ's rule silently; a few tokens need no more than
# the usual damping; a rank-1 weighting cannot fit scale and mean, but with the default exact
# compensation the codes are weighted by a Schur complement that is not rank 1, so nothing warns
# (GPTQ's diagonal compensation still does: test_rank_one_warns_under_diagonal_compensation).
CASES = {
    "healthy": (lambda: _inputs(2048), None, None),
    "dead_columns": (_dead_columns, None, None),
    "dead_block": (_dead_block, DEAD_BLOCK_1, DEAD_BLOCK_1),
    "all_dead": (lambda: torch.zeros(8, IN), r"\(blocks 0-1\)", r"\(blocks 0-1\)"),
    "rank_one": (_rank_one, None, None),
    "16_tokens": (lambda: _inputs(16), None, None),
}
# Both code selections, both levels; order only matters to the modulator. (The modulator's binary
# order 2 at OSR 2 is left out of the quality check: GPTQ's linear compensation does not steer
# that loop, it loses to data-free ~1.2x even with a healthy Hessian.)
CONFIGS = [("gram", "binary", 1), ("gram", "ternary", 1), ("sigma_delta", "binary", 1),
           ("sigma_delta", "ternary", 2)]


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X


def _output_error(W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - W_hat) @ X.T).pow(2).sum())


@functools.lru_cache(maxsize=None)
def _data_free(cfg: sdq.SDQConfig) -> torch.Tensor:
    return sdq.quantize_weight(W, cfg).dequantize()


@contextlib.contextmanager
def _expect_warning(match: str | None):
    """Exactly one CalibrationWarning, naming the layer and matching `match`; none when None."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    for w in record:  # anything else goes on to pytest's filters
        if not issubclass(w.category, CalibrationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    messages = [str(w.message) for w in record if issubclass(w.category, CalibrationWarning)]
    if match is None:
        assert messages == []
        return
    assert len(messages) == 1, messages
    assert LAYER in messages[0] and re.search(match, messages[0]), messages[0]


@pytest.mark.parametrize("codes,levels,order", CONFIGS)
@pytest.mark.parametrize("case", list(CASES))
def test_calibrated_sdq_survives_and_helps(case, codes, levels, order):
    make_inputs, gram_warning, other_warning = CASES[case]
    X = make_inputs()
    cfg = sdq.SDQConfig(osr=2, levels=levels, order=order, codes=codes)
    with _expect_warning(gram_warning if codes == "gram" else other_warning):
        qw = quantize_linear(W, cfg, _hessian(X), name=LAYER)
    assert torch.isfinite(qw.scale.float()).all() and torch.isfinite(qw.mean.float()).all()
    W_hat = qw.dequantize()
    assert torch.isfinite(W_hat).all()
    # Dead inputs contribute nothing to either side: this is the error on the live columns.
    assert _output_error(W_hat, X) <= _output_error(_data_free(cfg), X) * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize("codes", ["gram", "sigma_delta"])
def test_dead_block_gets_the_uncalibrated_codes(codes):
    """No data says anything about a dead block: it is quantized as quantize_weight would, not
    zeroed (an MoE expert that saw no token keeps its weights)."""
    cfg = sdq.SDQConfig(osr=2, levels="ternary", codes=codes)
    with pytest.warns(CalibrationWarning, match="block 1"):
        W_hat = sdq.quantize_weight_calibrated(W, _hessian(_dead_block()), cfg).dequantize()
    torch.testing.assert_close(W_hat[:, BLOCK:], _data_free(cfg)[:, BLOCK:], rtol=0, atol=1e-5)
    assert W_hat[:, BLOCK:].abs().mean() > 0.5  # not zeroed


def test_all_dead_hessian_equals_data_free():
    cfg = sdq.SDQConfig(osr=1, levels="binary", codes="gram")
    with pytest.warns(CalibrationWarning, match="blocks 0-1"):
        qw = sdq.quantize_weight_calibrated(W, torch.zeros(IN, IN), cfg)
    data_free = sdq.quantize_weight(W, cfg)
    assert np.array_equal(qw.codes(), data_free.codes())
    torch.testing.assert_close(qw.dequantize(), data_free.dequantize(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_baseline_survives_and_helps(case):
    make_inputs, _, warning = CASES[case]
    X = make_inputs()
    with _expect_warning(warning):
        result = quantize_linear(W, BaselineConfig("gptq", bits=3), _hessian(X), name=LAYER)
    W_hat = result.dequantize()
    assert torch.isfinite(W_hat).all()
    assert _output_error(W_hat, X) <= _output_error(rtn(W, 3), X) * (1 + 1e-4) + 1e-6


def test_gptq_dead_group_is_rtn():
    with pytest.warns(CalibrationWarning, match="block 1"):
        W_hat = gptq_quantize(W, _hessian(_dead_block()), 3)
    assert torch.equal(W_hat[:, BLOCK:], rtn(W[:, BLOCK:], 3))


@pytest.mark.parametrize("codes", ["gram", "sigma_delta"])
def test_damping_grows_until_it_factorises_and_says_so(codes):
    """Undamped, a 16-token Hessian of 256 columns has no Cholesky factor: the damping grows."""
    H = _hessian(_inputs(16))
    cfg = sdq.SDQConfig(osr=1, codes=codes)
    expected = f"{LAYER}: .*percdamp=0; succeeded with percdamp=0.01"
    with pytest.warns(CalibrationWarning, match=expected):
        qw = sdq.quantize_weight_calibrated(W, H, cfg, percdamp=0.0, name=LAYER)
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.warns(CalibrationWarning, match="percdamp=0; succeeded"):
        assert torch.isfinite(gptq_quantize(W, H, 3, percdamp=0.0, name=LAYER)).all()


def test_undamped_gram_matrix_is_damped_with_a_warning():
    """G = D^T C D has rank <= 128 < 256 samples: gram_damp=0 cannot factorise."""
    cfg = sdq.SDQConfig(osr=2, codes="gram", gram_damp=0.0)
    with pytest.warns(CalibrationWarning, match=r"Gram matrix damped by 0\.01 .*\(blocks 0-1\)"):
        qw = sdq.quantize_weight_calibrated(W, _hessian(_inputs(2048)), cfg, name=LAYER)
    assert torch.isfinite(qw.dequantize()).all()


def _block_problem(levels="ternary"):
    """Rotated, up-sampled rows of W's first block: the inputs of gram_codes."""
    cfg = sdq.SDQConfig(osr=2, levels=levels, codes="gram")
    g = blocks.block_groups(IN, BLOCK, cfg.osr)[0]
    rows = blocks.rotate(W[:, :BLOCK].contiguous(), blocks.hadamard_signs(BLOCK, cfg.seed)).double()
    return rows @ blocks.resampler(g.padded, g.m).T, rows, g, cfg


@pytest.mark.parametrize("C", [torch.zeros(BLOCK, BLOCK, dtype=torch.float64),
                               torch.full((BLOCK, BLOCK), float("nan"), dtype=torch.float64)])
def test_unusable_block_covariance_falls_back_to_identity(C):
    u, rows, g, cfg = _block_problem()
    notes = []
    codes, s, mu = gram_codes(u, rows, g, cfg, C, notes.append)
    ref_codes, ref_s, ref_mu = gram_codes(u, rows, g, cfg, None)
    assert any("uncalibrated codes" in n for n in notes), notes
    assert np.array_equal(codes, ref_codes) and torch.equal(s, ref_s) and torch.equal(mu, ref_mu)


def _codes_waveform():
    u, rows, g, cfg = _block_problem()
    codes, _, _ = gram_codes(u, rows, g, cfg)
    return torch.from_numpy(codes).double() @ blocks.resampler(g.m, g.padded).T, rows


def test_refit_with_dead_weighting_is_the_plain_fit():
    a, w = _codes_waveform()
    s, mu, fell_back = refit_scale_mean(a, w, torch.zeros(BLOCK, BLOCK, dtype=torch.float64))
    s0, mu0, _ = refit_scale_mean(a, w, None)
    assert torch.isfinite(s).all() and torch.isfinite(mu).all()
    assert fell_back.all()
    assert torch.equal(s, s0) and torch.equal(mu, mu0)


def test_rank_one_warns_under_diagonal_compensation():
    cfg = sdq.SDQConfig(osr=2, levels="binary", codes="gram", compensation="diagonal")
    with _expect_warning(r"scale/mean fit"):
        qw = quantize_linear(W, cfg, _hessian(_rank_one()), name=LAYER)
    assert torch.isfinite(qw.dequantize()).all()


def test_refit_with_rank_one_weighting_is_finite_and_respects_the_data():
    """Rank 1 (rounded through float32, as real Hessians are) cannot fix two parameters; the
    fallback still fits what the weighting sees better than the plain fit does."""
    a, w = _codes_waveform()
    v = torch.randn(BLOCK, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    C = torch.outer(v, v).float().double()
    s, mu, fell_back = refit_scale_mean(a, w, C)
    assert torch.isfinite(s).all() and torch.isfinite(mu).all() and fell_back.all()
    s0, mu0, _ = refit_scale_mean(a, w, None)
    seen = lambda s, mu: ((s[:, None] * a + mu[:, None] - w) @ v).pow(2).sum()  # noqa: E731
    assert seen(s, mu) < 0.1 * seen(s0, mu0)
    plain = lambda s, mu: (s[:, None] * a + mu[:, None] - w).pow(2).sum()  # noqa: E731
    assert plain(s, mu) < 2 * plain(s0, mu0)  # and stays a fit of the weights, not of noise


def test_refit_keeps_a_healthy_weighting():
    a, w = _codes_waveform()
    X = _inputs(2048)[:, :BLOCK].double()
    s, mu, fell_back = refit_scale_mean(a, w, X.T @ X / X.shape[0])
    assert not fell_back.any()
    s0, mu0, _ = refit_scale_mean(a, w, None)
    assert not torch.allclose(s, s0)  # the weighting changed the fit


def test_non_finite_scale_is_never_packed():
    cfg = sdq.SDQConfig(osr=2)
    signs = np.ones(BLOCK, np.float32)
    asm = _Assembler(OUT, IN, cfg, signs)
    g = blocks.block_groups(IN, BLOCK, cfg.osr)[0]
    s = torch.ones(OUT, dtype=torch.float16)
    s[5] = float("nan")
    with pytest.raises(ValueError, match="non-finite scale or mean"):
        asm.put(g, 0, 1, np.zeros((OUT, g.m), np.int8), s, torch.zeros(OUT, dtype=torch.float16))


def test_one_warning_per_layer_names_every_reason():
    X = _dead_block()
    cfg = sdq.SDQConfig(osr=2, codes="gram", gram_damp=0.0)
    with pytest.warns(CalibrationWarning) as record:
        sdq.quantize_weight_calibrated(W, _hessian(X), cfg, percdamp=0.0, name=LAYER)
    assert len(record) == 1
    message = str(record[0].message)
    for part in (LAYER, "no calibration data", "Gram matrix damped"):
        assert part in message, message
