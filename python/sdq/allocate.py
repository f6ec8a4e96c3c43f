"""MultiOSR: spend an average OSR budget unevenly over a model's linears (docs/method.md, "MultiOSR").

Two stages, both the same operation ("spread"): a target mean is shared out as
``base + c * sigma^-alpha`` with ``c`` chosen so that the parameter-weighted mean hits the target.

1. Across decoder layers, with the layer's pooled weight std, target = the budget ``A``.
2. Inside each layer, across its linears, target = that layer's (rounded) OSR.

Every OSR lives on the grid ``k * step`` inside ``[min_osr, max_osr]``. Rounding to the grid moves the
mean, so each stage is followed by a greedy repair, and a last repair runs over all linears at once.

Pooling. A layer's std is ``sqrt(sum n_i std_i^2 / sum n_i)``: the exact pooled std when every
linear's weights have zero mean, which holds closely for LLM weights; per-linear means are not kept in
``LinearStat``, so the between-linear part of the variance is ignored on purpose.

Repair. After rounding, single grid steps are moved one at a time, each strictly shrinking
``|average - target|``: first on the linears whose unrounded value sat closest to the rounding
boundary (the grid point they "nearly" took), larger linears first among equals. When no single step
helps any more, a breadth-first search over net step counts per distinct linear size (up to 64
steps) looks for a mix that closes the rest, e.g. ``3 * 43 - 8 * 16 = 1`` in Llama-7B's units of
``4096 * 256`` weights. So the average equals the budget exactly whenever the budget is reachable on
the step grid, provided the sizes share a common factor that leaves at most 2^15 size units to
search (true of transformer shapes; arbitrary sizes make exactness a subset-sum problem and only
the greedy part runs). Always, the average is within one step of the budget.

The global pass (all linears, after each layer was repaired to its own OSR) is fenced: it does not
move a layer's mean more than one step off that layer's OSR. Only if the fence would leave the
budget more than one step away does an unfenced pass take over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import MAX_OSR


@dataclass(frozen=True)
class LinearStat:
    """One quantized linear: its decoder layer, its name inside that layer, its size and weight std."""

    layer: int
    name: str  # qualified name inside the decoder layer, e.g. "self_attn.q_proj"
    numel: int
    std: float


@dataclass(frozen=True)
class _Grid:
    """OSR = k * step for integer k in [k_min, k_max]."""

    step: float
    k_min: int
    k_max: int


# --------------------------------------------------------------------------------------- validation

def _make_grid(step: float, min_osr: float | None, max_osr: float) -> _Grid:
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive number, got {step}")
    if min_osr is None:
        min_osr = step
    if not (math.isfinite(max_osr) and 0 < max_osr <= MAX_OSR):
        raise ValueError(f"max_osr must be in (0, {MAX_OSR:g}], got {max_osr}")
    if not (math.isfinite(min_osr) and min_osr > 0):
        raise ValueError(f"min_osr must be positive, got {min_osr}")
    # A tiny slack so that e.g. 16.0 / 0.1 = 159.99999 still admits the grid point 16.0.
    k_min = max(1, math.ceil(min_osr / step - 1e-9))
    k_max = math.floor(max_osr / step + 1e-9)
    if k_min > k_max:
        raise ValueError(f"no multiple of step={step} lies in [min_osr={min_osr}, max_osr={max_osr}]")
    return _Grid(step, k_min, k_max)


def _check_budget(budget: float, grid: _Grid) -> None:
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive OSR, got {budget}")
    lo, hi = grid.k_min * grid.step, grid.k_max * grid.step
    # Outside [lo, hi] the average could not come within one step, so refuse instead of clamping.
    if budget > hi + 1e-12:
        raise ValueError(f"budget={budget} exceeds max_osr (largest grid OSR {hi:g})")
    if budget < lo - 1e-12:
        raise ValueError(f"budget={budget} is below min_osr (smallest grid OSR {lo:g})")


def _check_stats(stats: list[LinearStat]) -> None:
    if not stats:
        raise ValueError("stats is empty: nothing to allocate")
    seen = set()
    for s in stats:
        if isinstance(s.numel, bool) or not isinstance(s.numel, (int, np.integer)) or s.numel <= 0:
            raise ValueError(f"numel must be a positive integer, got {s.numel!r} for layer {s.layer} {s.name}")
        if not (math.isfinite(s.std) and s.std > 0):
            raise ValueError(f"std must be positive and finite, got {s.std!r} for layer {s.layer} {s.name}")
        key = (s.layer, s.name)
        if key in seen:
            raise ValueError(f"duplicate linear {key} in stats")
        seen.add(key)


def _by_layer(stats: list[LinearStat]) -> dict[int, list[LinearStat]]:
    layers: dict[int, list[LinearStat]] = {}
    for s in stats:
        layers.setdefault(s.layer, []).append(s)
    return dict(sorted(layers.items()))


def _pooled_std(linears: list[LinearStat]) -> float:
    # Zero-mean pooling (see module docstring): the mean square of the whole layer.
    n = np.array([s.numel for s in linears], dtype=np.float64)
    var = np.array([s.std for s in linears], dtype=np.float64) ** 2
    return float(np.sqrt(np.dot(n, var) / n.sum()))


# ------------------------------------------------------------------------------------ the spreading

def _spread(sigma: np.ndarray, weight: np.ndarray, alpha: float, base: float, target: float,
            lo: float, hi: float) -> np.ndarray:
    """Unrounded ``clip(base + c * sigma^-alpha, lo, hi)`` whose weighted mean is ``target``.

    Without clipping this is exactly method.md's formula (its ``L (A - base) / sum sigma^-alpha``
    and the inner ``k`` are both this ``c``); with clipping ``c`` is found by bisection, because the
    mean is monotone in ``c`` but only piecewise linear.
    """
    weight = weight / weight.sum()
    # Below base the formula would hand the *most* OSR to the widest weights; lowering the base to
    # the target keeps the direction (and gives a uniform allocation at target == base).
    base = min(base, target)
    pull = sigma ** -alpha
    pull = pull / pull.max()  # scale-free, so the bisection range does not depend on the std units

    def mean_at(c: float) -> float:
        return float(np.dot(weight, np.clip(base + c * pull, lo, hi)))

    c_lo, c_hi = 0.0, max(hi - base, 0.0) / pull.min()
    if mean_at(c_lo) >= target:
        return np.clip(np.full_like(pull, base), lo, hi)
    for _ in range(200):  # the bracket halves each time: 200 halvings reach float resolution
        mid = 0.5 * (c_lo + c_hi)
        if mean_at(mid) < target:
            c_lo = mid
        else:
            c_hi = mid
    return np.clip(base + c_hi * pull, lo, hi)


def _round(exact: np.ndarray, grid: _Grid) -> np.ndarray:
    return np.clip(np.rint(exact / grid.step), grid.k_min, grid.k_max).astype(np.int64)


# ---------------------------------------------------------------------------------------- the repair

_MAX_COMBINATION_MOVES = 64  # depth of the final exact search; a transformer's sizes need far fewer
_MAX_COMBINATION_WINDOW = 1 << 15  # offsets (in gcd units) that search may walk; Llama-7B needs 43

class _Fence:
    """Keeps every group's (layer's) weighted mean within one step of its own target during a repair."""

    def __init__(self, layer_of: np.ndarray, targets: dict[int, float], step: float):
        _, self.group = np.unique(layer_of, return_inverse=True)
        self.target_k = np.array([targets[l] for l in sorted(targets)]) / step

    def allows(self, k: np.ndarray, mass: np.ndarray, direction: int) -> np.ndarray:
        """Per linear: would one step of it in ``direction`` keep its layer inside the fence?"""
        group_mass = np.bincount(self.group, mass)
        mean_k = np.bincount(self.group, mass * k) / group_mass
        after = mean_k[self.group] + direction * mass / group_mass[self.group]
        return np.abs(after - self.target_k[self.group]) <= 1 + 1e-9


def _gap(k: np.ndarray, mass: np.ndarray, target_k: float) -> float:
    """Signed distance of the weighted mean from the target, in units of (one step on one weight)."""
    return float(np.dot(mass, k) - target_k * mass.sum())


def _single_step(k, exact_k, mass, gap, grid, fence) -> bool:
    """Move one linear one step towards the target if that strictly shrinks |gap|."""
    direction = -1 if gap > 0 else 1
    room = k > grid.k_min if direction < 0 else k < grid.k_max
    helps = room & (mass < 2 * abs(gap))  # |gap - m| < |gap|  <=>  0 < m < 2 |gap|
    if fence is not None:
        helps &= fence.allows(k, mass, direction)
    if not helps.any():
        return False
    # How far the unrounded value already leaned the way we move: the one that leaned most was the
    # closest to taking that grid point anyway. Ties go to the larger linear (bigger bite).
    lean = direction * (exact_k - k)
    order = np.lexsort((-mass, -lean))
    i = next(int(j) for j in order if helps[j])
    k[i] += direction
    return True


def _closest_combination(mass: np.ndarray, gap: float, max_moves: int) -> dict[int, int] | None:
    """Net step counts per distinct size, at most ``max_moves`` steps in all, that bring ``gap``
    closest to zero (fewest steps among equals); ``None`` if nothing beats ``gap`` itself.

    Breadth-first over the integer offsets ``x`` (in units of the sizes' gcd) reachable by
    +-size moves; an offset past ``|gap| + max size`` can never lead back closer, so it is cut.
    """
    sizes = np.unique(mass.astype(np.int64))
    unit = int(np.gcd.reduce(sizes))
    moves = np.concatenate([sizes, -sizes]) // unit
    gap_u = gap / unit
    reach = int(math.ceil(abs(gap_u))) + int(moves.max())
    if reach > _MAX_COMBINATION_WINDOW:
        return None  # sizes without a large common factor: the offsets are too many to walk
    parent = np.full(2 * reach + 1, -1, dtype=np.int64)  # move that first reached offset x (index x+reach)
    seen = np.zeros(2 * reach + 1, dtype=bool)
    seen[reach] = True
    frontier = np.array([0], dtype=np.int64)
    best_x, best = 0, abs(gap_u)
    for _ in range(max_moves):
        nxt = (frontier[:, None] + moves[None, :]).ravel()
        via = np.tile(np.arange(moves.size), frontier.size)
        keep = (np.abs(nxt) <= reach) & ~seen[np.clip(nxt + reach, 0, 2 * reach)]
        nxt, first = np.unique(nxt[keep], return_index=True)
        if nxt.size == 0:
            break
        seen[nxt + reach] = True
        parent[nxt + reach] = via[keep][first]
        score = np.abs(gap_u + nxt)
        i = int(np.argmin(score))
        if score[i] < best - 1e-9:
            best_x, best = int(nxt[i]), float(score[i])
        if best < 1e-9:
            break
        frontier = nxt
    if best_x == 0:
        return None
    net: dict[int, int] = {}
    x = best_x
    while x != 0:
        move = int(moves[parent[x + reach]])
        net[abs(move) * unit] = net.get(abs(move) * unit, 0) + (1 if move > 0 else -1)
        x -= move
    return net


def _apply_combination(k, exact_k, mass, net: dict[int, int], grid: _Grid, fence) -> bool:
    """Carry out ``net`` steps per size on the linears that lean that way most; False if no room."""
    trial = k.copy()
    for size, count in net.items():
        direction = 1 if count > 0 else -1
        for _ in range(abs(count)):
            room = (mass == size) & ((trial < grid.k_max) if direction > 0 else (trial > grid.k_min))
            if fence is not None:
                room &= fence.allows(trial, mass, direction)
            if not room.any():
                return False
            lean = np.where(room, direction * (exact_k - trial), -np.inf)
            trial[int(np.argmax(lean))] += direction
    k[:] = trial
    return True


def _repair(k: np.ndarray, exact: np.ndarray, mass: np.ndarray, target: float, grid: _Grid,
            fence: _Fence | None = None, good_enough: float = 0.0) -> np.ndarray:
    """Local search on the grid indices ``k`` towards weighted mean ``target`` (see module doc);
    it stops early once the mean is within ``good_enough`` steps of the target."""
    k = k.copy()
    exact_k = exact / grid.step
    target_k = target / grid.step
    mass = mass.astype(np.float64)
    enough = good_enough * mass.sum()
    while abs(_gap(k, mass, target_k)) > enough:
        if not _single_step(k, exact_k, mass, _gap(k, mass, target_k), grid, fence):
            break
    if abs(_gap(k, mass, target_k)) <= enough:
        return k
    # Single steps are stuck: the rest may still close with a mix of sizes (e.g. 3 * 43 - 8 * 16).
    net = _closest_combination(mass, _gap(k, mass, target_k), _MAX_COMBINATION_MOVES)
    if net is not None:
        _apply_combination(k, exact_k, mass, net, grid, fence)
    return k


# ---------------------------------------------------------------------------------------- public API

def layer_osrs(stats: list[LinearStat], budget: float, *, base: float = 1.0, alpha: float = 1.5,
               step: float = 0.25, min_osr: float | None = None,
               max_osr: float = MAX_OSR) -> dict[int, float]:
    """Stage 1 of MultiOSR: one grid OSR per decoder layer, parameter-weighted mean ~= ``budget``.

    Layers with a smaller pooled weight std get more OSR (``sigma^-alpha``).
    """
    grid = _make_grid(step, min_osr, max_osr)
    _check_budget(budget, grid)
    _check_stats(stats)
    layers = _by_layer(stats)
    sigma = np.array([_pooled_std(v) for v in layers.values()])
    mass = np.array([sum(s.numel for s in v) for v in layers.values()], dtype=np.float64)
    exact = _spread(sigma, mass, alpha, base, budget, grid.k_min * step, grid.k_max * step)
    k = _repair(_round(exact, grid), exact, mass, budget, grid)
    return {layer: float(ki * step) for layer, ki in zip(layers, k)}


def multi_osr(stats: list[LinearStat], budget: float, *, base: float = 1.0, alpha: float = 1.5,
              alpha_inner: float = 1.5, alpha_inner_high: float = 0.1, high_osr: float = 3.5,
              step: float = 0.25, min_osr: float | None = None,
              max_osr: float = MAX_OSR) -> dict[tuple[int, str], float]:
    """MultiOSR allocation: ``{(layer, name): osr}`` for every linear in ``stats``.

    stats:     one ``LinearStat`` per quantized linear (see ``weight_stats``).
    budget:    the average OSR, weighted by parameter count, in ``[min_osr, max_osr]``.
    base, alpha:             the across-layer formula ``base + c * sigma_l^-alpha``.
    alpha_inner(_high):      the within-layer exponent; the flatter ``_high`` one applies to layers
                             whose OSR is at least ``high_osr`` (they have bits to spare).
    step:      every OSR is a multiple of it (1/128 multiples are exact for block size 128).
    min_osr:   smallest OSR (default: ``step``); max_osr: largest (at most 16).

    The realised parameter-weighted average is within one step of ``budget`` (see the module
    docstring for when it is exact). Raises ``ValueError`` on an empty or invalid ``stats`` and on a
    budget outside ``[min_osr, max_osr]``.
    """
    per_layer = layer_osrs(stats, budget, base=base, alpha=alpha, step=step, min_osr=min_osr,
                           max_osr=max_osr)
    grid = _make_grid(step, min_osr, max_osr)
    lo, hi = grid.k_min * step, grid.k_max * step
    keys, exact, k = [], [], []
    for layer, linears in _by_layer(stats).items():
        target = per_layer[layer]
        a = alpha_inner_high if target >= high_osr else alpha_inner
        sigma = np.array([s.std for s in linears], dtype=np.float64)
        mass = np.array([s.numel for s in linears], dtype=np.float64)
        layer_exact = _spread(sigma, mass, a, base, target, lo, hi)
        # Repair inside the layer first, so each layer keeps its own OSR before the global pass.
        k.append(_repair(_round(layer_exact, grid), layer_exact, mass, target, grid))
        exact.append(layer_exact)
        keys += [(s.layer, s.name) for s in linears]
    linears = [s for layer in _by_layer(stats).values() for s in layer]
    mass = np.array([s.numel for s in linears], dtype=np.float64)
    # The global pass may not push any layer more than one step off its own OSR. Only if that leaves
    # the budget more than a step away (the hard promise) does an unfenced pass step in.
    fence = _Fence(np.array([s.layer for s in linears]), per_layer, step)
    exact = np.concatenate(exact)
    final = _repair(np.concatenate(k), exact, mass, budget, grid, fence)
    final = _repair(final, exact, mass, budget, grid, good_enough=1.0)
    return {key: float(ki * step) for key, ki in zip(keys, final)}


def allocation_table(alloc: dict[tuple[int, str], float], stats: list[LinearStat]) -> str:
    """A printable table: one row per layer (its parameter-weighted OSR, then each linear's OSR).

    The last line gives the realised average OSR and the total code bits (codes only, binary levels:
    one bit per sample, so ``numel * OSR``; ternary stores two planes, i.e. twice that; block
    padding and the fp16 scales are not included).
    """
    _check_stats(stats)
    missing = [(s.layer, s.name) for s in stats if (s.layer, s.name) not in alloc]
    if missing:
        raise ValueError(f"alloc has no OSR for {len(missing)} linear(s), e.g. {missing[0]}")
    names = list(dict.fromkeys(s.name for s in stats))  # column order = first appearance
    widths = [max(len(n), 6) for n in names]
    lines = ["layer  OSR    " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for layer, linears in _by_layer(stats).items():
        osr = {s.name: alloc[(s.layer, s.name)] for s in linears}
        mean = sum(s.numel * osr[s.name] for s in linears) / sum(s.numel for s in linears)
        cells = [f"{osr[n]:.4g}".rjust(w) if n in osr else "-".rjust(w) for n, w in zip(names, widths)]
        lines.append(f"{layer:5d}  {mean:<6.4f} " + "  ".join(cells))
    bits = sum(s.numel * alloc[(s.layer, s.name)] for s in stats)
    total = sum(s.numel for s in stats)
    lines.append(f"average OSR {bits / total:.6f} over {total} weights; code bits {bits:.6g} binary "
                 f"({bits / 8 / 2**20:.2f} MiB), {2 * bits:.6g} ternary")
    return "\n".join(lines)


def _std_float64(weight: torch.Tensor, chunk_elems: int = 1 << 22) -> float:
    """Population std in float64, a block of rows at a time so huge matrices need no full fp64 copy."""
    w = weight.detach().reshape(weight.shape[0], -1)
    rows = max(1, chunk_elems // max(1, w.shape[1]))
    n, mean, m2 = 0, 0.0, 0.0
    for part in torch.split(w, rows):
        var_c, mean_c = torch.var_mean(part.to(torch.float64), correction=0)
        n_c, mean_c = part.numel(), float(mean_c)
        # Chan et al. merge of (count, mean, M2): stable where sum/sum-of-squares would cancel.
        delta = mean_c - mean
        total = n + n_c
        m2 += float(var_c) * n_c + delta * delta * n * n_c / total
        mean += delta * n_c / total
        n = total
    return math.sqrt(m2 / n)


def weight_stats(layers: list[dict[str, torch.nn.Linear]]) -> list[LinearStat]:
    """One ``LinearStat`` per linear; ``layers[l]`` maps names inside decoder layer ``l`` to modules."""
    stats = []
    for index, linears in enumerate(layers):
        for name, module in linears.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
                raise TypeError(f"layer {index} {name}: expected a linear with a non-empty 2-D weight, "
                                f"got {type(module).__name__}")
            stats.append(LinearStat(index, name, weight.numel(), _std_float64(weight)))
    return stats


# ------------------------------------------------------------------- MultiOSR by measured sensitivity
#
# The variance rule above guesses from weight statistics which linears need more OSR. This rule
# measures it: each linear's output error tr(dW H dW^T) under its calibration Hessian H (inputs of
# the full-precision model) at a few candidate OSRs, then the allocation that minimises the summed
# error with the parameter-weighted average OSR equal to the budget: an exact knapsack (dynamic
# programme) over the step grid, errors between candidates interpolated log-linearly.

MULTI_OSR_RULES = ("sensitivity", "variance")
_MAX_DP_CELLS = 200_000_000  # the knapsack's choice table (int8): beyond it, sizes are coarsened


@dataclass(frozen=True)
class Sensitivity:
    """One linear's output error ``tr(dW H dW^T)`` measured at candidate OSRs (ascending)."""

    layer: int
    name: str
    numel: int
    osrs: tuple[float, ...]
    errors: tuple[float, ...]


def _check_curves(curves: list[Sensitivity]) -> None:
    if not curves:
        raise ValueError("no sensitivities: nothing to allocate")
    seen = set()
    for c in curves:
        where = f"layer {c.layer} {c.name}"
        if isinstance(c.numel, bool) or not isinstance(c.numel, (int, np.integer)) or c.numel <= 0:
            raise ValueError(f"numel must be a positive integer, got {c.numel!r} for {where}")
        osrs, errors = np.asarray(c.osrs, dtype=float), np.asarray(c.errors, dtype=float)
        if osrs.ndim != 1 or osrs.size == 0 or osrs.shape != errors.shape:
            raise ValueError(f"{where}: osrs and errors must be equally long and non-empty")
        if not (np.all(np.isfinite(osrs)) and osrs[0] > 0 and np.all(np.diff(osrs) > 0)):
            raise ValueError(f"{where}: osrs must be positive and strictly ascending, got {c.osrs}")
        if not (np.all(np.isfinite(errors)) and np.all(errors >= 0)):
            raise ValueError(f"{where}: errors must be finite and >= 0, got {c.errors}")
        if (c.layer, c.name) in seen:
            raise ValueError(f"duplicate linear {(c.layer, c.name)} in the sensitivities")
        seen.add((c.layer, c.name))


def _error_on_grid(c: Sensitivity, osr: np.ndarray) -> np.ndarray:
    """The error at each OSR of `osr` (inside the measured range): log-linear between candidates
    (errors fall about geometrically with the OSR), made non-increasing (more samples never hurt
    the best choice: the lower OSR's codes are among the higher's)."""
    errors = np.minimum.accumulate(np.asarray(c.errors, dtype=float))
    if errors[0] == 0:
        return np.zeros_like(osr)
    floor = errors[0] * 1e-12  # a measured zero (exact weights) stays ~zero on the log scale
    return np.exp(np.interp(osr, c.osrs, np.log(np.maximum(errors, floor))))


def _knapsack(units: np.ndarray, costs: list[np.ndarray], extra: int) -> list[int] | None:
    """Choice c_i per item with sum units_i * c_i == extra (or the nearest reachable total, below
    first) that minimises sum costs_i[c_i]; ties go to the smaller c (the smaller OSR)."""
    size = int(sum(u * (len(c) - 1) for u, c in zip(units, costs))) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(costs), size), dtype=np.int8)
    reach = 0
    for i, (u, cost) in enumerate(zip(units, costs)):
        new = np.full(size, np.inf)
        for c, e in enumerate(cost):
            s = int(u) * c
            cand = best[:reach + 1] + e
            better = cand < new[s:s + reach + 1]
            new[s:s + reach + 1][better] = cand[better]
            choice[i, s:s + reach + 1][better] = c
        best, reach = new, reach + int(u) * (len(cost) - 1)
    finite = np.flatnonzero(np.isfinite(best))
    target = finite[np.argmin(np.abs(finite - extra) * 2 + (finite > extra))]
    picks, x = [], int(target)
    for i in range(len(costs) - 1, -1, -1):
        c = int(choice[i, x])
        picks.append(c)
        x -= int(units[i]) * c
    return picks[::-1]


def sensitivity_osr(curves: list[Sensitivity], budget: float, *, step: float = 0.25,
                    min_osr: float | None = None,
                    max_osr: float | None = None) -> dict[tuple[int, str], float]:
    """MultiOSR by measured sensitivity: ``{(layer, name): osr}`` minimising the summed measured
    output error with the parameter-weighted average OSR equal to ``budget``.

    Every OSR is a multiple of ``step`` inside each linear's measured range (and inside
    ``[min_osr, max_osr]`` when given). The average equals the budget exactly whenever the budget
    is reachable on the grid (``budget * total / step`` a whole number of the sizes' common unit,
    the usual case for transformer shapes), else it is the nearest reachable average (within one
    step). A linear whose error is zero at every candidate gets its smallest OSR unless the
    budget cannot be spent elsewhere.
    """
    _check_curves(curves)
    lo_all = min_osr if min_osr is not None else 0.0
    hi_all = max_osr if max_osr is not None else MAX_OSR
    grid = _make_grid(step, min_osr, hi_all)
    ks, costs = [], []
    for c in curves:
        k_lo = max(grid.k_min, math.ceil(max(c.osrs[0], lo_all) / step - 1e-9))
        k_hi = min(grid.k_max, math.floor(min(c.osrs[-1], hi_all) / step + 1e-9))
        if k_lo > k_hi:
            raise ValueError(f"layer {c.layer} {c.name}: no multiple of step={step} inside its "
                             f"measured OSRs {c.osrs} and [min_osr, max_osr]")
        k = np.arange(k_lo, k_hi + 1)
        if len(k) > 127:
            raise ValueError(f"layer {c.layer} {c.name}: {len(k)} grid OSRs; use a larger step")
        ks.append(k)
        costs.append(_error_on_grid(c, k * step))
    mass = np.array([c.numel for c in curves], dtype=np.int64)
    unit = int(np.gcd.reduce(mass))
    cells = len(curves) * int(sum(m // unit * (len(k) - 1) for m, k in zip(mass, ks)))
    if cells > _MAX_DP_CELLS:  # sizes without a large common unit: coarsen (average then ~exact)
        unit = max(unit, int(mass.sum() * len(curves) * max(map(len, ks)) // _MAX_DP_CELLS) + 1)
    units = np.maximum(1, np.rint(mass / unit)).astype(np.int64)
    base = sum(int(u) * int(k[0]) for u, k in zip(units, ks))
    top = sum(int(u) * int(k[-1]) for u, k in zip(units, ks))
    wanted = budget / step * units.sum()
    if not (math.isfinite(budget) and base - 1e-9 <= wanted <= top + 1e-9):
        raise ValueError(f"budget={budget} is outside the OSRs the sensitivities cover "
                         f"({base * step / units.sum():g} .. {top * step / units.sum():g})")
    picks = _knapsack(units, costs, int(round(wanted)) - base)
    return {(c.layer, c.name): float((k[0] + p) * step) for c, k, p in zip(curves, ks, picks)}


def default_candidates(budget: float, step: float = 0.25) -> tuple[float, ...]:
    """The OSRs measured by default: 0.5, 0.75, 1, 1.5 and 2 times the budget, on the step grid."""
    osrs = {min(MAX_OSR, max(step, math.floor(budget * f / step + 0.5) * step))
            for f in (0.5, 0.75, 1.0, 1.5, 2.0)}
    return tuple(sorted(osrs))


def _probe_error(W: torch.Tensor, H: torch.Tensor, config, rows: int) -> float:
    """tr(dW H dW^T) of data-free SDQ at `config`, estimated on `rows` evenly spaced rows (the
    encoder treats rows independently, so the sum over a sample scales to the whole)."""
    from .methods.sdq import quantize_weight
    stride = max(1, W.shape[0] // rows)
    sample = W.detach()[::stride].float().cpu()
    diff = (sample - quantize_weight(sample, config).dequantize()).double()
    return float(((diff @ H.double().cpu()) * diff).sum()) * W.shape[0] / sample.shape[0]


@torch.no_grad()
def measure_sensitivity(model: torch.nn.Module, calibration: torch.Tensor, config,
                        osrs: tuple[float, ...], *, rows: int = 128,
                        progress: bool = True) -> list[Sensitivity]:
    """Each weight quantize_ would quantize (fused experts' slices included): its output error
    under its calibration Hessian (full-precision inputs, layer by layer) after data-free SDQ at
    each OSR of `osrs`. The probe uses the paper's modulator (the core's, fast) on `rows` rows
    per weight whatever `config.codes` is: only the relative errors matter. An expert that no
    calibration token reached has error 0 (it gets the smallest OSR)."""
    from tqdm.auto import tqdm

    from .pipeline import _layer_hessians
    from .traversal import capture_layer_inputs, decoder_layers, plan_layer, run_layer
    osrs = tuple(sorted(float(o) for o in osrs))
    probe = config.replace(codes="sigma_delta")
    hidden, kwargs = capture_layer_inputs(model, calibration)
    curves = []
    layers = list(enumerate(decoder_layers(model)))
    for index, layer in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress):
        plan = plan_layer(layer)
        hessians = _layer_hessians(layer, plan.linears, plan.experts, plan.routed, hidden,
                                   kwargs)[0]
        for name, W in plan.weights().items():
            H = hessians.get(name)
            errors = tuple(0.0 if H is None else _probe_error(W, H, probe.replace(osr=o), rows)
                           for o in osrs)
            curves.append(Sensitivity(index, name, W.numel(), osrs, errors))
        del hessians
        hidden = run_layer(layer, hidden, kwargs)
    return curves


def sensitivity_allocation(model: torch.nn.Module, calibration: torch.Tensor, config, *,
                           osrs: tuple[float, ...] | None = None, step: float = 0.25,
                           rows: int = 128,
                           progress: bool = True) -> dict[tuple[int, str], float]:
    """MultiOSR by sensitivity for `model` at the average OSR `config.osr`: measure_sensitivity at
    `osrs` (default_candidates of the budget), then sensitivity_osr. The model is not modified."""
    osrs = default_candidates(config.osr, step) if osrs is None else osrs
    curves = measure_sensitivity(model, calibration, config, osrs, rows=rows, progress=progress)
    return sensitivity_osr(curves, config.osr, step=step)
