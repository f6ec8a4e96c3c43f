"""The WGM partition in the compiled core (sdq._core.wgm_partition / wgm_cost) against sdq.ref.

Exact optimum by brute force for small rows, greedy never below the optimum, the core's greedy,
windowed and DP boundaries identical to the NumPy reference on random and awkward rows, threads
without effect on results, and one clear error per bad input.
"""
import itertools

import numpy as np
import pytest

from sdq import ref
from sdq._native import core

C = core()
METHODS = ["greedy", "windowed", "dp"]


def _sorted_rows(x):
    return np.ascontiguousarray(np.sort(np.abs(np.asarray(x, np.float32)), axis=1))


def _all_partitions(n, groups):
    """Every boundary vector of [0, n) cut into `groups` non-empty groups."""
    for cuts in itertools.combinations(range(1, n), groups - 1):
        yield np.array((0, *cuts, n), np.int64)


def _check_layout(b, n, groups):
    assert b.dtype == np.int64 and b.shape[1] == groups + 1
    k = min(n, groups)  # non-empty groups per row
    assert (b[:, 0] == 0).all() and (b[:, k:] == n).all()
    assert (np.diff(b[:, : k + 1], axis=1) > 0).all()


# --- the optimum, known -----------------------------------------------------------------------

@pytest.mark.parametrize("n,groups", [(2, 1), (5, 2), (7, 3), (9, 4), (10, 2), (10, 5), (8, 7)])
def test_dp_finds_the_brute_force_minimum(rng, n, groups):
    v = _sorted_rows(rng.exponential(1.0, (3, n)))
    got = C.wgm_partition(v, groups, method="dp")
    every = np.stack(list(_all_partitions(n, groups)))
    for r in range(3):
        costs = ref.wgm_cost_ref(np.repeat(v[r : r + 1], len(every), 0), every)
        assert C.wgm_cost(v[r : r + 1], got[r : r + 1])[0] == pytest.approx(costs.min(), rel=1e-12)
        # Random values make the minimiser unique (almost surely): then the cuts must be its cuts.
        if np.sum(np.isclose(costs, costs.min(), rtol=1e-12, atol=0)) == 1:
            np.testing.assert_array_equal(got[r], every[np.argmin(costs)])


def test_two_clusters_split_where_they_meet():
    v = np.array([[1, 1, 1, 5, 5, 5, 5]], np.float32)
    for method in METHODS:
        np.testing.assert_array_equal(C.wgm_partition(v, 2, window=1, method=method), [[0, 3, 7]])
    # Two constant groups: no squared error, only lam / |g| each.
    assert C.wgm_cost(v, np.array([[0, 3, 7]]))[0] == pytest.approx(0.75 / 3 + 0.75 / 4)
    # One group of everything, mean 23/7: sse = 3 * (16/7)^2 + 4 * (12/7)^2 = 1344/49.
    assert C.wgm_cost(v, np.array([[0, 7]]), lam=0.0)[0] == pytest.approx(1344 / 49)


def test_cost_is_the_objective(rng):
    # Against the definition, not the prefix-sum formula: sum of |g| * Var(g) + lam / |g|.
    v = _sorted_rows(rng.standard_normal((6, 500)) * 3)
    b = C.wgm_partition(v, 9, window=20)
    want = [sum(len(g) * np.var(g.astype(np.float64)) + 0.6 / len(g)
                for g in np.split(row, bounds[1:-1])) for row, bounds in zip(v, b)]
    np.testing.assert_allclose(C.wgm_cost(v, b, lam=0.6), want, rtol=1e-9)
    np.testing.assert_allclose(ref.wgm_cost_ref(v, b, lam=0.6), want, rtol=1e-9)


@pytest.mark.parametrize("method", ["greedy", "windowed"])
def test_greedy_is_never_below_the_optimum(rng, method):
    v = _sorted_rows(rng.standard_normal((40, 48)))
    for groups in (2, 5, 12):
        best = C.wgm_cost(v, C.wgm_partition(v, groups, method="dp"))
        got = C.wgm_cost(v, C.wgm_partition(v, groups, window=4, method=method))
        assert (got >= best - 1e-12 * np.abs(best)).all()
        assert (got > best).any()  # the greedy is not exact: equality everywhere would be suspect


# --- the core equals the reference exactly ----------------------------------------------------

def _awkward_rows():
    rng = np.random.default_rng(99)
    normal = rng.standard_normal((4, 40))
    two = np.concatenate([np.full((4, 20), 0.1), np.full((4, 20), 3.0)], axis=1)
    return {
        "normal": normal,
        "exponential": rng.exponential(2.0, (4, 40)),
        "all_equal": np.full((4, 40), 0.37),
        "zeros": np.zeros((4, 40)),
        "two_clusters": two + rng.uniform(0, 1e-3, two.shape),
        "few_levels": np.round(rng.uniform(0, 3, (4, 40))),  # many exact ties
        "huge": normal * 1e30,
        "tiny": normal * 1e-30,
        "subnormal": rng.integers(0, 50, (4, 40)) * np.float32(1e-45),
        "mixed_scales": normal * np.logspace(-20, 20, 40),
    }


@pytest.mark.parametrize("name", list(_awkward_rows()))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups,window", [(1, 512), (4, 3), (8, 1), (8, 512), (13, 5), (40, 7),
                                           (64, 2)])
@pytest.mark.parametrize("lam", [0.75, 0.0])
def test_core_equals_reference_on_awkward_rows(name, method, groups, window, lam):
    v = _sorted_rows(_awkward_rows()[name])
    got = C.wgm_partition(v, groups, window=window, lam=lam, method=method)
    _check_layout(got, v.shape[1], groups)
    np.testing.assert_array_equal(got, ref.wgm_partition_ref(v, groups, window, lam, method))
    np.testing.assert_allclose(C.wgm_cost(v, got, lam), ref.wgm_cost_ref(v, got, lam), rtol=1e-12)


@pytest.mark.parametrize("name", ["all_equal", "zeros", "few_levels", "subnormal", "two_clusters"])
@pytest.mark.parametrize("method,window", [("greedy", 512), ("windowed", 2)])
def test_core_equals_reference_on_ties_beyond_the_scan(name, method, window):
    # 300 values (150 windows of 2) are more initial groups than the core's linear scan takes
    # (128): its heap must break the same ties the same way.
    v = _sorted_rows(np.tile(_awkward_rows()[name], (1, 8))[:, :300])
    for groups in (1, 7, 130):
        got = C.wgm_partition(v, groups, window=window, method=method)
        np.testing.assert_array_equal(got, ref.wgm_partition_ref(v, groups, window, 0.75, method))


@pytest.mark.parametrize("n,groups,window", [(64, 4, 512), (64, 8, 8), (1000, 32, 16),
                                             (1000, 32, 512), (2000, 16, 1), (777, 3, 100)])
@pytest.mark.parametrize("method", ["greedy", "windowed"])
def test_core_equals_reference_on_random_rows(rng, n, groups, window, method):
    rows = 40 if n <= 64 else 2  # many 64-value blocks, as in the per-row block mode
    v = _sorted_rows(rng.standard_normal((rows, n)))
    got = C.wgm_partition(v, groups, window=window, method=method)
    _check_layout(got, n, groups)
    np.testing.assert_array_equal(got, ref.wgm_partition_ref(v, groups, window, 0.75, method))


@pytest.mark.parametrize("n,groups", [(30, 4), (60, 10)])
def test_core_dp_equals_reference_dp(rng, n, groups):
    v = _sorted_rows(rng.standard_normal((5, n)))
    np.testing.assert_array_equal(C.wgm_partition(v, groups, method="dp"),
                                  ref.wgm_partition_ref(v, groups, method="dp"))


# --- short rows, windows and threads -----------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_rows_shorter_than_groups_are_singletons(method):
    v = np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 2.0]], np.float32)
    want = np.array([[0, 1, 2, 3, 3, 3]] * 2)
    np.testing.assert_array_equal(C.wgm_partition(v, 5, method=method), want)
    np.testing.assert_array_equal(C.wgm_partition(v, 3, method=method), want[:, :4])  # n == G


def test_windowed_starts_from_windows():
    v = _sorted_rows(np.random.default_rng(5).standard_normal((3, 100)))
    # Exactly G windows (the last one shorter): nothing to merge, the windows are the answer.
    np.testing.assert_array_equal(C.wgm_partition(v, 4, window=30),
                                  np.tile([0, 30, 60, 90, 100], (3, 1)))
    # Merging windows never cuts inside one.
    assert (C.wgm_partition(v, 5, window=10)[:, 1:-1] % 10 == 0).all()


@pytest.mark.parametrize("window", [1, 13, 99, 100, 10**9])
def test_windowed_with_too_few_windows_is_greedy(window):
    v = _sorted_rows(np.random.default_rng(6).standard_normal((3, 100)))
    groups = 8
    got = C.wgm_partition(v, groups, window=window, method="windowed")
    if -(-100 // window) < groups or window == 1:  # fewer windows than groups, or singletons
        np.testing.assert_array_equal(got, C.wgm_partition(v, groups, method="greedy"))
    else:
        assert not np.array_equal(got, C.wgm_partition(v, groups, method="greedy"))


@pytest.mark.parametrize("method", METHODS)
def test_threads_do_not_change_results(rng, method):
    v = _sorted_rows(rng.standard_normal((37, 200)))
    one = C.wgm_partition(v, 6, window=8, method=method, threads=1)
    for threads in (2, 3, 8, 64, 0):
        np.testing.assert_array_equal(C.wgm_partition(v, 6, window=8, method=method,
                                                      threads=threads), one)


# --- errors --------------------------------------------------------------------------------------

GOOD = np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)


@pytest.mark.parametrize("values,kwargs,err,match", [
    (GOOD[0], {}, ValueError, "values must be 2-D"),
    (GOOD[:, ::2], {}, ValueError, "values must be C-contiguous"),
    (GOOD.astype(np.float64), {}, TypeError, "values must have dtype float32"),
    (GOOD.tolist(), {}, TypeError, "values must be a numpy array"),
    (np.zeros((0, 4), np.float32), {}, ValueError, r"values is empty: shape \(0, 4\)"),
    (np.zeros((2, 0), np.float32), {}, ValueError, r"values is empty: shape \(2, 0\)"),
    (GOOD, {"groups": 0}, ValueError, "groups must be >= 1, got 0"),
    (GOOD, {"window": 0}, ValueError, "window must be >= 1, got 0"),
    (GOOD, {"lam": -0.5}, ValueError, "lam must be finite and >= 0"),
    (GOOD, {"lam": float("nan")}, ValueError, "lam must be finite and >= 0"),
    (GOOD, {"lam": float("inf")}, ValueError, "lam must be finite and >= 0"),
    (GOOD, {"method": "kmeans"}, ValueError, "method must be 'greedy', 'windowed' or 'dp'"),
    (np.zeros((1, 4097), np.float32), {"method": "dp"}, ValueError, "n <= 4096; got n = 4097"),
])
def test_bad_arguments_are_clear_errors(values, kwargs, err, match):
    with pytest.raises(err, match=match):
        C.wgm_partition(values, kwargs.pop("groups", 2), **kwargs)


@pytest.mark.parametrize("bad,match", [
    (float("nan"), r"values\[1, 2\] is nan: values must be finite"),
    (float("inf"), r"values\[1, 2\] is inf: values must be finite"),
    (-0.25, r"values\[1, 2\] = -0.25 is negative"),
    (0.1, r"values row 1 is not sorted ascending: values\[1, 2\] = 0.1.* < 0.5"),
])
@pytest.mark.parametrize("method", METHODS)
def test_bad_values_name_the_first_offender(bad, match, method):
    v = np.tile(GOOD, (4, 1))
    v[1, 2] = bad
    v[3, 1] = bad  # a later row is bad too: the message names the first one
    with pytest.raises(ValueError, match=match):
        C.wgm_partition(v, 2, method=method, threads=4)
    with pytest.raises(ValueError, match=match):
        C.wgm_cost(v, np.tile([0, 2, 4], (4, 1)))


def test_negative_zero_is_a_magnitude():
    v = np.array([[-0.0, 0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(C.wgm_partition(v, 2, method="dp"), [[0, 2, 3]])


@pytest.mark.parametrize("boundaries,err,match", [
    (np.array([[0, 2, 4]], np.int32), TypeError, "boundaries must have dtype int64"),
    (np.array([0, 2, 4]), ValueError, "boundaries must be 2-D"),
    (np.array([[0, 2, 4]] * 2), ValueError, r"boundaries must have shape \(1, groups \+ 1\)"),
    (np.array([[0]]), ValueError, r"boundaries must have shape \(1, groups \+ 1\)"),
    (np.array([[1, 2, 4]]), ValueError, r"boundaries\[0, 0\] = 1"),
    (np.array([[0, 3, 2, 4]]), ValueError, r"boundaries\[0, 2\] = 2"),
    (np.array([[0, 2, 2, 4]]), ValueError, r"boundaries\[0, 2\] = 2"),  # empty group before n
    (np.array([[0, 2, 3]]), ValueError, r"boundaries\[0, 2\] = 3"),
    (np.array([[0, 2, 5]]), ValueError, r"boundaries row 0 is not a partition of 0..4"),
])
def test_bad_boundaries_are_clear_errors(boundaries, err, match):
    with pytest.raises(err, match=match):
        C.wgm_cost(GOOD, boundaries)


def test_cost_ignores_trailing_empty_groups():
    np.testing.assert_allclose(C.wgm_cost(GOOD, np.array([[0, 4, 4, 4]])),
                               C.wgm_cost(GOOD, np.array([[0, 4]])), rtol=0)


@pytest.mark.parametrize("n", [500, 4096])
def test_heap_greedy_equals_reference_on_a_grid_with_many_equal_merge_costs(n):
    """Values on an fp16-like grid (as real weights stored in low precision are) make many adjacent
    merges cost exactly the same; a heap that compared a node with its sibling's children broke
    these ties differently from the reference (regression)."""
    rng = np.random.default_rng(0)
    v = _sorted_rows((rng.integers(0, n // 2, n) * 2.0 ** -15)[None, :])
    got = C.wgm_partition(v, 32, method="greedy")
    np.testing.assert_array_equal(got, ref.wgm_partition_ref(v, 32, 512, 0.75, "greedy"))
