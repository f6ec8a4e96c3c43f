"""The compiled core against sdq.ref: modulator, FWHT, resampling, bitplanes, layout."""
import numpy as np
import pytest
import scipy.signal

from sdq import ref
from sdq._native import core

C = core()
SHAPES = [(1, 1), (1, 7), (3, 128), (17, 33), (40, 256), (5, 1000)]


def _z(rng, rows, m, scale=1.0):
    return (rng.standard_normal((rows, m)) * scale).astype(np.float32)


# --- modulator -------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,m", SHAPES)
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_modulator_matches_reference_bit_exactly(rng, rows, m, order, levels):
    # Equal means identical codes: the core keeps float32 state and the reference performs the same
    # float32 operations in the same order, so even samples sitting on a threshold agree.
    z = _z(rng, rows, m)
    tau = rng.uniform(0.1, 0.9, rows).astype(np.float32)
    got = C.sigma_delta_modulate(z, tau, order, levels)
    np.testing.assert_array_equal(got, ref.sigma_delta_ref(z, tau, order, levels))
    np.testing.assert_array_equal(got, ref.sigma_delta_columnwise_ref(z, tau, order, levels))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e3, 1e30])
def test_modulator_awkward_values(rng, levels, scale):
    z = _z(rng, 19, 64, scale)
    z[3] = 0.0                                   # an all-zero chain
    z[4, ::2] = 0.5                              # samples exactly on the threshold below
    tau = np.full(19, 0.5, np.float32)
    got = C.sigma_delta_modulate(z, tau, 2, levels)
    np.testing.assert_array_equal(got, ref.sigma_delta_ref(z, tau, 2, levels))
    allowed = {-1, 1} if levels == "binary" else {-1, 0, 1}
    assert set(np.unique(got)) <= allowed


def test_modulator_threads_do_not_change_result(rng):
    z = _z(rng, 333, 300)
    tau = np.full(333, 0.4, np.float32)
    one = C.sigma_delta_modulate(z, tau, 1, "ternary", threads=1)
    for t in (2, 3, 7):
        np.testing.assert_array_equal(C.sigma_delta_modulate(z, tau, 1, "ternary", threads=t), one)


def test_modulator_first_order_is_noise_shaped(rng):
    # The running sum of (z - q) stays bounded: the defining property of a stable 1st-order loop.
    z = np.clip(_z(rng, 8, 4096) * 0.3, -0.9, 0.9)
    q = C.sigma_delta_modulate(z, None, 1, "binary").astype(np.float64)
    assert np.abs(np.cumsum(z - q, axis=1)).max() <= 2.0


def test_modulator_errors(rng):
    z = _z(rng, 4, 8)
    with pytest.raises(ValueError, match="order"):
        C.sigma_delta_modulate(z, None, 3, "binary")
    with pytest.raises(ValueError, match="levels"):
        C.sigma_delta_modulate(z, None, 1, "quaternary")
    with pytest.raises(ValueError, match="tau"):
        C.sigma_delta_modulate(z, None, 1, "ternary")
    with pytest.raises(ValueError, match="tau must have shape"):
        C.sigma_delta_modulate(z, np.ones(3, np.float32), 1, "ternary")
    with pytest.raises(TypeError, match="z must have dtype float32"):
        C.sigma_delta_modulate(z.astype(np.float64), None, 1, "binary")
    with pytest.raises(ValueError, match="z must be 2-D"):
        C.sigma_delta_modulate(z[0], None, 1, "binary")
    with pytest.raises(TypeError, match="numpy array"):
        C.sigma_delta_modulate([[0.1]], None, 1, "binary")


# --- FWHT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("n", [1, 2, 8, 128, 1024, 4096])
@pytest.mark.parametrize("with_signs", [False, True])
def test_fwht_matches_reference(rng, rows, n, with_signs):
    x = _z(rng, rows, n)
    signs = (rng.integers(0, 2, n) * 2 - 1).astype(np.float32) if with_signs else None
    for inverse in (False, True):
        got = x.copy()
        C.fwht(got, signs, inverse)
        want = ref.fwht_ref(x, signs, inverse)
        # float32 butterflies: error grows like log2(n) roundings of values of size |x|.
        # float32 butterflies: log2(n) roundings, each relative to the row's norm.
        tol = 1.2e-7 * (np.log2(n) + 1) * np.linalg.norm(x, axis=1, keepdims=True)
        assert np.all(np.abs(got - want) <= tol + 1e-30)


def _float32_butterflies(x, signs, inverse):
    """The core's FWHT order in float32: signs, the reference's butterflies in float32, then the
    scale float32(1 / sqrt(n)) (inverse: times sign * scale)."""
    n = x.shape[1]
    y = ref.sylvester_butterflies(x * signs if signs is not None and not inverse else x)
    scale = np.float32(1.0 / np.sqrt(np.float64(n)))
    return y * (signs * scale if signs is not None and inverse else scale)


@pytest.mark.parametrize("n", [8, 16, 32, 64, 128, 256, 1024])
@pytest.mark.parametrize("with_signs", [False, True])
def test_fwht_is_bitwise_the_float32_butterflies(rng, n, with_signs):
    """Whichever path the row takes (in registers up to 128, stage by stage above, portable
    without AVX2), every value is the same rounding of the same sums."""
    x = _z(rng, 5, n) * np.float32(1e3)
    x[1] = 0
    x[2, ::3] = np.float32(1e-38)  # denormal-range sums
    signs = (rng.integers(0, 2, n) * 2 - 1).astype(np.float32) if with_signs else None
    for inverse in (False, True):
        got = x.copy()
        C.fwht(got, signs, inverse)
        np.testing.assert_array_equal(got, _float32_butterflies(x, signs, inverse))


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_fwht_reference_is_the_sylvester_matrix(rng, n):
    x = rng.standard_normal((3, n))
    s = rng.choice([-1.0, 1.0], n)
    h = ref.hadamard_matrix(n) / np.sqrt(n)
    np.testing.assert_allclose(ref.fwht_ref(x, s), (x * s) @ h.T, atol=1e-12)
    np.testing.assert_allclose(ref.fwht_ref(x, s, inverse=True), (x @ h.T) * s, atol=1e-12)
    i = np.arange(n)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(np.bitwise_and.outer(i, i))
    np.testing.assert_array_equal(ref.hadamard_matrix(n), 1 - 2 * parity)


def test_fwht_twice_is_identity_and_orthonormal(rng):
    x = _z(rng, 7, 256)
    signs = (rng.integers(0, 2, 256) * 2 - 1).astype(np.float32)
    y = x.copy()
    C.fwht(y, signs, False)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    C.fwht(y, signs, True)
    np.testing.assert_allclose(y, x, atol=1e-5)
    z = x.copy()
    C.fwht(z)
    C.fwht(z)  # without signs H/sqrt(n) is its own inverse
    np.testing.assert_allclose(z, x, atol=1e-5)


def test_fwht_errors(rng):
    with pytest.raises(ValueError, match="power of two"):
        C.fwht(_z(rng, 2, 12))
    with pytest.raises(ValueError, match="signs must have shape"):
        C.fwht(_z(rng, 2, 8), np.ones(4, np.float32))
    ro = _z(rng, 2, 8)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        C.fwht(ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.fwht(_z(rng, 8, 8)[:, ::2].copy(order="F")[:, :4])


# --- resampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(128, 256), (128, 192), (128, 320), (64, 96), (7, 16),
                                        (8, 13), (256, 128), (13, 8), (5, 5), (1, 3)])
def test_resample_matrix_is_scipy_resample(rng, n_in, n_out):
    R = C.resample_matrix(n_in, n_out)
    x = rng.standard_normal((4, n_in))
    np.testing.assert_allclose(x @ R.T.astype(np.float64), scipy.signal.resample(x, n_out, axis=1),
                               atol=2e-6)
    np.testing.assert_allclose(x @ R.T.astype(np.float64), ref.resample_ref(x, n_out), atol=2e-6)


@pytest.mark.parametrize("B,M", [(128, 256), (128, 160), (64, 96), (8, 13), (16, 16)])
def test_down_after_up_is_identity_and_constants_survive(B, M):
    U = C.resample_matrix(B, M).astype(np.float64)
    D = C.resample_matrix(M, B).astype(np.float64)
    np.testing.assert_allclose(D @ U, np.eye(B), atol=1e-5)
    np.testing.assert_allclose(U @ np.ones(B), np.ones(M), atol=1e-5)
    np.testing.assert_allclose(D @ np.ones(M), np.ones(B), atol=1e-5)


# --- bitplanes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 31), (3, 32), (5, 33), (64, 256), (7, 1000)])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_pack_unpack_round_trip_and_layout(rng, rows, cols, levels):
    alphabet = [-1, 1] if levels == "binary" else [-1, 0, 1]
    codes = rng.choice(alphabet, (rows, cols)).astype(np.int8)
    sign, nz = C.pack_bitplanes(codes, levels)
    want_sign, want_nz = ref.pack_ref(codes, levels)
    np.testing.assert_array_equal(sign, want_sign)
    if levels == "ternary":
        np.testing.assert_array_equal(nz, want_nz)
    else:
        assert nz is None
    np.testing.assert_array_equal(C.unpack_bitplanes(sign, nz, cols), codes)
    np.testing.assert_array_equal(ref.unpack_ref(sign, nz, cols), codes)


def test_pack_rejects_codes_outside_alphabet():
    with pytest.raises(ValueError, match="codes must be in"):
        C.pack_bitplanes(np.array([[1, 0, -1]], np.int8), "binary")
    with pytest.raises(ValueError, match="codes must be in"):
        C.pack_bitplanes(np.array([[1, 2]], np.int8), "ternary")
    with pytest.raises(ValueError, match="does not match"):
        C.unpack_bitplanes(np.zeros((1, 2), np.uint32), None, 100)


# --- layout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_features,B,osr", [(576, 128, 2.0), (200, 128, 1.5), (64, 128, 2.5),
                                               (1000, 64, 1.0), (4096, 128, 0.75), (5, 4, 3.3)])
def test_layout_matches_reference(in_features, B, osr):
    lay = C.layout(in_features, B, osr)
    blocks = ref.block_layout_ref(in_features, B, osr)
    assert lay["num_blocks"] == len(blocks)
    assert lay["width"] == [b[1] for b in blocks]
    assert lay["padded"] == [b[2] for b in blocks]
    assert lay["m"] == [b[3] for b in blocks]
    assert lay["code_offset"] == [b[4] for b in blocks]


def test_layout_errors():
    with pytest.raises(ValueError, match="power of two"):
        C.layout(100, 96, 2.0)
    with pytest.raises(ValueError, match="osr"):
        C.layout(100, 128, 0.0)
    with pytest.raises(ValueError, match="osr"):
        C.layout(100, 128, C.MAX_OSR + 1)
