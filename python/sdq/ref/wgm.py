"""Plain NumPy reference of the WGM partition (method.md section 2; cpp/include/sdq/wgm.h).

Written the simple way: the greedy recomputes every adjacent merge cost at every step (O(n^2) per
row, all rows of a batch at once) and the DP fills its table one cell at a time. Costs come from
float64 prefix sums by the same operations, in the same order, as the C++ core, so ties resolve
alike (lowest index first) and the boundaries agree exactly. Nothing in the package imports this
module at run time.
"""
from __future__ import annotations

import numpy as np

__all__ = ["wgm_partition_ref", "wgm_cost_ref", "wgm_group_cost_ref"]

_METHODS = ("greedy", "windowed", "dp")


def _prefix(values):
    """float64 prefix sums of v and v*v, [rows, n + 1], starting at 0."""
    v = np.asarray(values, np.float64)
    zero = np.zeros((v.shape[0], 1))
    return (np.concatenate([zero, np.cumsum(v, axis=1)], axis=1),
            np.concatenate([zero, np.cumsum(v * v, axis=1)], axis=1))


def _span(s, a, b):
    """s[b] - s[a] along the last axis: one row (1-D s) or every row (2-D s, 2-D a and b)."""
    if s.ndim == 1:
        return s[b] - s[a]
    return np.take_along_axis(s, b, 1) - np.take_along_axis(s, a, 1)


def wgm_group_cost_ref(s1, s2, a, b, lam):
    """sse + lam / |g| of the groups [a, b) (a < b) from the prefix sums s1, s2 of v and v*v."""
    m = (b - a).astype(np.float64)
    t1, t2 = _span(s1, a, b), _span(s2, a, b)
    sse = np.maximum(t2 - t1 * t1 / m, 0.0)  # rounding can take a constant group below zero
    return sse + lam / m


def _initial_starts(n, groups, method, window):
    """Windows of `window` values, or singletons (greedy, or fewer than `groups` windows)."""
    windows = -(-n // window)
    step = window if method == "windowed" and windows >= groups else 1
    return np.arange(0, n, step, dtype=np.int64)


def _merge_greedy(s1, s2, starts, n, groups, lam):
    """Merge the cheapest adjacent pair of every row (leftmost on ties) until `groups` remain."""
    rows = s1.shape[0]
    starts = np.tile(starts, (rows, 1))
    while starts.shape[1] > groups:
        ends = np.concatenate([starts[:, 1:], np.full((rows, 1), n, np.int64)], axis=1)
        a, mid, c = starts[:, :-1], starts[:, 1:], ends[:, 1:]
        delta = (wgm_group_cost_ref(s1, s2, a, c, lam) - wgm_group_cost_ref(s1, s2, a, mid, lam)
                 - wgm_group_cost_ref(s1, s2, mid, c, lam))
        drop = np.argmin(delta, axis=1) + 1  # the right group's start disappears
        keep = np.ones(starts.shape, bool)
        keep[np.arange(rows), drop] = False
        starts = starts[keep].reshape(rows, -1)
    return np.concatenate([starts, np.full((rows, 1), n, np.int64)], axis=1)


def _dp_row(s1, s2, n, groups, lam):
    """Exact least-cost partition of one row into `groups` groups (lowest split on ties)."""
    best = np.full((groups + 1, n + 1), np.inf)
    split = np.full((groups + 1, n + 1), -1, np.int64)
    for j in range(1, n - groups + 2):
        best[1, j] = wgm_group_cost_ref(s1, s2, np.int64(0), np.int64(j), lam)
    for g in range(2, groups + 1):
        for j in range(g, n - (groups - g) + 1):
            i = np.arange(g - 1, j)
            total = best[g - 1, i] + wgm_group_cost_ref(s1, s2, i, np.full_like(i, j), lam)
            k = int(np.argmin(total))
            best[g, j], split[g, j] = total[k], i[k]
    b = np.empty(groups + 1, np.int64)
    b[0], b[groups], j = 0, n, n
    for g in range(groups, 1, -1):
        j = split[g, j]
        b[g - 1] = j
    return b


def wgm_partition_ref(values, groups, window=512, lam=0.75, method="windowed"):
    """Boundaries int64 [rows, groups + 1] as sdq._core.wgm_partition returns them.

    values: [rows, n], each row sorted ascending, non-negative, finite (not checked here).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    values = np.asarray(values, np.float32)
    rows, n = values.shape
    if n <= groups:  # n singletons, then n repeated
        return np.tile(np.minimum(np.arange(groups + 1), n), (rows, 1)).astype(np.int64)
    s1, s2 = _prefix(values)
    if method == "dp":
        return np.stack([_dp_row(s1[r], s2[r], n, groups, lam) for r in range(rows)])
    starts = _initial_starts(n, groups, method, window)
    return _merge_greedy(s1, s2, starts, n, groups, lam)


def wgm_cost_ref(values, boundaries, lam=0.75):
    """float64 [rows]: sum over the non-empty groups of |g| Var(g) + lam / |g|."""
    values = np.asarray(values, np.float32)
    boundaries = np.asarray(boundaries, np.int64)
    s1, s2 = _prefix(values)
    out = np.zeros(values.shape[0])
    for r, b in enumerate(boundaries):
        for a, e in zip(b[:-1], b[1:]):
            if e > a:
                out[r] += wgm_group_cost_ref(s1[r], s2[r], a, e, lam)
    return out
