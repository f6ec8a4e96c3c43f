"""MultiOSR by measured sensitivity: the knapsack keeps the budget, is optimal, and the measurement
feeds quantize_."""
import itertools
import math

import numpy as np
import pytest
import torch

from sdq.allocate import (Sensitivity, default_candidates, measure_sensitivity,
                          sensitivity_allocation, sensitivity_osr)

# SmolLM2-135M's linears in units of 576 * 192 weights: q, k, v, o, gate, up, down
SIZES = {"q": 3, "k": 1, "v": 1, "o": 3, "gate": 8, "up": 8, "down": 8}
UNIT = 576 * 192
OSRS = (1.0, 1.5, 2.0, 3.0, 4.0)


def _curves(layers=6, seed=0, zero=()):
    """Errors that fall geometrically with the OSR, at rates and levels that differ per linear."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(layers):
        for name, units in SIZES.items():
            level = 0.0 if (layer, name) in zero else rng.uniform(0.1, 10) * units
            rate = rng.uniform(0.5, 2.0)
            errors = tuple(level * math.exp(-rate * o) for o in OSRS)
            out.append(Sensitivity(layer, name, units * UNIT, OSRS, errors))
    return out


def _average(alloc, curves) -> float:
    return sum(alloc[(c.layer, c.name)] * c.numel for c in curves) / sum(c.numel for c in curves)


def _total_error(alloc, curves) -> float:
    from sdq.allocate import _error_on_grid
    return sum(float(_error_on_grid(c, np.array([alloc[(c.layer, c.name)]]))[0]) for c in curves)


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0, 2.25, 2.5, 3.0, 3.75, 4.0])
def test_budget_is_kept_exactly(budget):
    curves = _curves()
    alloc = sensitivity_osr(curves, budget)
    assert _average(alloc, curves) == pytest.approx(budget, abs=1e-12)
    assert all(o % 0.25 == 0 and 1.0 <= o <= 4.0 for o in alloc.values())


def test_optimal_against_brute_force():
    # Every allocation of four linears on the 0.5 grid that meets the budget, enumerated.
    curves = [c for c in _curves(layers=1, seed=3) if c.name in ("q", "k", "o", "gate")]
    grid = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    for budget in (1.5, 2.0, 2.5, 3.0):
        alloc = sensitivity_osr(curves, budget, step=0.5)
        best = math.inf
        for combo in itertools.product(grid, repeat=len(curves)):
            a = {(c.layer, c.name): o for c, o in zip(curves, combo)}
            if abs(_average(a, curves) - budget) < 1e-12:
                best = min(best, _total_error(a, curves))
        assert _total_error(alloc, curves) == pytest.approx(best, rel=1e-12)
        assert _average(alloc, curves) == pytest.approx(budget, abs=1e-12)


def test_monotone_in_the_budget():
    curves = _curves(seed=1)
    budgets = np.arange(1.0, 4.01, 0.25)
    errors = [_total_error(sensitivity_osr(curves, float(b)), curves) for b in budgets]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 10 * errors[-1]
    # More budget never takes OSR away from the most sensitive linear.
    top = max(curves, key=lambda c: c.errors[0])
    osr = [sensitivity_osr(curves, float(b))[(top.layer, top.name)] for b in budgets]
    assert osr == sorted(osr)


def test_zero_sensitivity_gets_the_minimum():
    zero = {(2, "down"), (4, "q"), (0, "k")}
    curves = _curves(zero=zero)
    for budget in (1.5, 2.5, 3.5):
        alloc = sensitivity_osr(curves, budget)
        assert all(alloc[key] == 1.0 for key in zero), budget
        assert _average(alloc, curves) == pytest.approx(budget, abs=1e-12)


def test_unreachable_budget_is_nearest():
    curves = _curves()
    budget = 2.31  # not a multiple of the step's reach
    alloc = sensitivity_osr(curves, budget)
    assert abs(_average(alloc, curves) - budget) <= 0.25 / (sum(SIZES.values()) * 6) + 1e-12


def test_errors():
    curves = _curves(layers=1)
    with pytest.raises(ValueError, match="outside"):
        sensitivity_osr(curves, 4.5)
    with pytest.raises(ValueError, match="outside"):
        sensitivity_osr(curves, 0.5)
    with pytest.raises(ValueError, match="no sensitivities"):
        sensitivity_osr([], 2.0)
    bad = Sensitivity(0, "x", 10, (2.0, 1.0), (1.0, 2.0))
    with pytest.raises(ValueError, match="ascending"):
        sensitivity_osr([bad], 1.5)
    bad = Sensitivity(0, "x", 10, (1.0, 2.0), (1.0, -2.0))
    with pytest.raises(ValueError, match=">= 0"):
        sensitivity_osr([bad], 1.5)
    with pytest.raises(ValueError, match="duplicate"):
        sensitivity_osr(curves + curves[:1], 2.0)


def test_default_candidates():
    assert default_candidates(2.0) == (1.0, 1.5, 2.0, 3.0, 4.0)
    assert default_candidates(1.5) == (0.75, 1.25, 1.5, 2.25, 3.0)  # 1.125 rounds up
    assert max(default_candidates(12.0)) == 16.0


def test_measured_on_a_model_and_quantized():
    import sdq
    from tiny_models import tiny_llama
    model = tiny_llama(seed=0)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = sdq.SDQConfig(osr=1.5, levels="binary")
    curves = measure_sensitivity(model, ids, cfg, (0.75, 1.5, 3.0), progress=False)
    assert len(curves) == 2 * len(SIZES)
    for c in curves:
        assert c.errors[0] > c.errors[-1] > 0, c  # more OSR, less output error
    alloc = sensitivity_allocation(model, ids, cfg, osrs=(0.75, 1.5, 3.0), progress=False)
    assert set(alloc) == {(c.layer, c.name) for c in curves}
    report = sdq.quantize_(model, cfg, ids, osr_for=lambda i, n: alloc[(i, n)], progress=False)
    assert report.average_osr == pytest.approx(1.5, abs=1e-12)
    assert len(set(alloc.values())) > 1  # the layers do differ in sensitivity


def test_cli_sensitivity_needs_calibration(capsys):
    from sdq.cli import main
    assert main(["quantize", "--multi-osr", "sensitivity", "--calib-samples", "0"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
