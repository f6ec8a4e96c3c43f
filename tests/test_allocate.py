"""MultiOSR allocation (python/sdq/allocate.py): budget, grid, direction, inner split, table, errors."""
import itertools
import math

import numpy as np
import pytest
import torch

from sdq.allocate import LinearStat, allocation_table, layer_osrs, multi_osr, weight_stats

BUDGETS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
STEP = 0.25
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def average(alloc, stats):
    return sum(s.numel * alloc[(s.layer, s.name)] for s in stats) / sum(s.numel for s in stats)


def random_stats(seed, n_layers=None):
    """Random layer count, linear count, sizes and stds (std spread over about a decade)."""
    rng = np.random.default_rng(seed)
    n_layers = n_layers or int(rng.integers(1, 12))
    stats = []
    for layer in range(n_layers):
        for name in NAMES[: int(rng.integers(1, len(NAMES) + 1))]:
            numel = int(rng.integers(1, 64)) * int(rng.choice([1, 7, 4096]))
            std = float(np.exp(rng.uniform(np.log(0.005), np.log(0.05))))
            stats.append(LinearStat(layer, name, numel, std))
    return stats


def llama_like(n_layers, stds):
    """Llama-7B-shaped layers (sizes in units of 4096 * 256) with one std per layer for every linear."""
    sizes = dict(zip(NAMES, (16, 16, 16, 16, 43, 43, 43)))
    return [LinearStat(l, n, sizes[n], stds[l]) for l in range(n_layers) for n in NAMES]


def layer_means(alloc, stats):
    by_layer = {}
    for s in stats:
        osr_sum, n = by_layer.get(s.layer, (0.0, 0))
        by_layer[s.layer] = (osr_sum + s.numel * alloc[(s.layer, s.name)], n + s.numel)
    return {layer: osr_sum / n for layer, (osr_sum, n) in by_layer.items()}


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_within_one_step_on_random_stats(budget):
    for seed in range(20):
        stats = random_stats(seed)
        alloc = multi_osr(stats, budget)
        assert set(alloc) == {(s.layer, s.name) for s in stats}
        assert abs(average(alloc, stats) - budget) <= STEP + 1e-12, seed
        # Local optimality: a step on any linear towards the budget either overshoots, leaves the
        # grid, or would push its layer more than one step off its own OSR (the layer fence).
        total = sum(s.numel for s in stats)
        gap = (average(alloc, stats) - budget) * total / STEP  # in (weights x steps)
        targets, means = layer_osrs(stats, budget), layer_means(alloc, stats)
        layer_mass = {l: sum(s.numel for s in stats if s.layer == l) for l in targets}
        move = -STEP if gap > 0 else STEP
        for s in stats:
            new = alloc[(s.layer, s.name)] + move
            after = means[s.layer] + move * s.numel / layer_mass[s.layer]
            assert (s.numel >= 2 * abs(gap) - 1e-6 or not STEP <= new <= 16.0
                    or abs(after - targets[s.layer]) > STEP + 1e-9), (seed, s)


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_osr_on_grid_and_in_bounds(budget):
    for seed in range(10):
        stats = random_stats(seed)
        for kw in ({}, {"min_osr": 1.0, "max_osr": 6.0}):
            alloc = multi_osr(stats, budget, **kw)
            lo, hi = kw.get("min_osr", STEP), kw.get("max_osr", 16.0)
            for osr in alloc.values():
                assert (osr / STEP) == round(osr / STEP)
                assert lo <= osr <= hi


@pytest.mark.parametrize("budget", BUDGETS)
def test_exact_when_all_linears_same_size(budget):
    # Equal sizes: the average moves in steps of STEP / K, so any budget on the STEP grid is reachable.
    for seed in range(20):
        stats = [LinearStat(s.layer, s.name, 4096, s.std) for s in random_stats(seed)]
        assert average(multi_osr(stats, budget), stats) == pytest.approx(budget, abs=1e-12)


def test_exact_on_llama_shapes():
    rng = np.random.default_rng(7)
    stats = llama_like(32, rng.uniform(0.01, 0.03, 32))
    for budget in BUDGETS:
        assert average(multi_osr(stats, budget), stats) == pytest.approx(budget, abs=1e-12)


def test_matches_brute_force_closest_on_tiny_cases():
    # Three linears on a short grid: enumerate every allocation and compare the best reachable gap.
    rng = np.random.default_rng(3)
    for _ in range(30):
        stats = [LinearStat(i, "w", int(rng.integers(1, 9)), float(rng.uniform(0.01, 0.05))) for i in range(3)]
        budget = float(rng.choice([0.5, 1.0, 1.25, 1.5, 2.0]))
        grid = [STEP * k for k in range(1, 13)]
        total = sum(s.numel for s in stats)
        best = min(abs(sum(s.numel * o for s, o in zip(stats, osrs)) / total - budget)
                   for osrs in itertools.product(grid, repeat=3))
        got = abs(average(multi_osr(stats, budget, max_osr=3.0), stats) - budget)
        if best == 0:
            assert got == pytest.approx(0, abs=1e-12), stats
        assert got <= STEP


def test_larger_std_gets_lower_or_equal_osr():
    stds = np.linspace(0.004, 0.04, 16)  # layer 0 has the smallest std
    stats = llama_like(16, stds)
    for budget in BUDGETS:
        per_layer = layer_osrs(stats, budget)
        osrs = [per_layer[l] for l in range(16)]
        assert all(a >= b for a, b in zip(osrs, osrs[1:])), (budget, osrs)
        if budget > 1.0:
            assert osrs[0] > osrs[-1]
        means = layer_means(multi_osr(stats, budget), stats)
        # The final pass moves single linears by one step, so layer means keep the order up to that.
        assert all(means[l] >= means[l + 1] - STEP for l in range(15))
        assert means[0] > means[15] or budget == 1.0


def test_formula_direction_inside_a_layer():
    # One layer: the layer gets the budget, its narrower linears get more OSR.
    stats = [LinearStat(0, f"w{i}", 1000, std) for i, std in enumerate((0.01, 0.02, 0.04))]
    alloc = multi_osr(stats, 2.0)
    assert alloc[(0, "w0")] >= alloc[(0, "w1")] >= alloc[(0, "w2")]
    assert alloc[(0, "w0")] > alloc[(0, "w2")]
    assert average(alloc, stats) == 2.0


@pytest.mark.parametrize("budget", BUDGETS)
def test_equal_stds_give_everyone_the_budget(budget):
    stats = [LinearStat(l, n, 100 * (i + 1), 0.02) for l in range(6) for i, n in enumerate(NAMES)]
    assert set(multi_osr(stats, budget).values()) == {budget}
    assert set(layer_osrs(stats, budget).values()) == {budget}


def test_base_above_budget_stays_uniform_direction():
    stats = llama_like(8, np.linspace(0.01, 0.03, 8))
    osrs = layer_osrs(stats, 0.75)
    assert [osrs[l] for l in range(8)] == sorted(osrs.values(), reverse=True)


@pytest.mark.parametrize("budget", BUDGETS)
def test_inner_allocation_honours_layer_osr(budget):
    for seed in range(10):
        stats = random_stats(seed)
        targets = layer_osrs(stats, budget)
        means = layer_means(multi_osr(stats, budget), stats)
        for layer, target in targets.items():
            assert abs(means[layer] - target) <= STEP + 1e-12, (seed, layer)


def test_high_layers_use_the_flat_exponent():
    # At OSR >= high_osr the inner exponent drops to 0.1, so the linears get (nearly) the same OSR.
    stats = [LinearStat(0, f"w{i}", 1000, std) for i, std in enumerate((0.01, 0.02, 0.04))]
    flat = multi_osr(stats, 4.0)
    steep = multi_osr(stats, 4.0, alpha_inner_high=1.5)
    spread = lambda a: max(a.values()) - min(a.values())
    assert spread(flat) < spread(steep)


def test_table_mentions_every_layer_and_the_average():
    stats = random_stats(5, n_layers=9)
    alloc = multi_osr(stats, 2.5)
    table = allocation_table(alloc, stats)
    rows = table.splitlines()
    assert len(rows) == 1 + 9 + 1
    for layer in range(9):
        assert rows[1 + layer].split()[0] == str(layer)
    for name in {s.name for s in stats}:
        assert name in rows[0]
    assert f"{average(alloc, stats):.6f}" in rows[-1]
    bits = sum(s.numel * alloc[(s.layer, s.name)] for s in stats)
    assert f"{bits:.6g}" in rows[-1]


def test_table_rejects_incomplete_alloc():
    stats = random_stats(1, n_layers=2)
    alloc = multi_osr(stats, 2.0)
    alloc.pop((stats[0].layer, stats[0].name))
    with pytest.raises(ValueError, match="no OSR"):
        allocation_table(alloc, stats)


def test_weight_stats_matches_float64_std():
    torch.manual_seed(0)
    layers = [{"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(48, 300, bias=False)} for _ in range(2)]
    layers[1]["b"].weight.data += 0.5  # a non-zero mean must not bias the chunked merge
    stats = weight_stats(layers)
    assert [(s.layer, s.name, s.numel) for s in stats] == [(0, "a", 2048), (0, "b", 14400),
                                                          (1, "a", 2048), (1, "b", 14400)]
    for s in stats:
        w = layers[s.layer][s.name].weight.detach().double()
        assert s.std == pytest.approx(float(w.std(correction=0)), rel=1e-12)
    # Tiny chunks exercise the merge across many row blocks.
    from sdq.allocate import _std_float64
    w = layers[1]["b"].weight.detach()
    assert _std_float64(w, chunk_elems=50) == pytest.approx(float(w.double().std(correction=0)), rel=1e-12)
    with pytest.raises(TypeError, match="2-D weight"):
        weight_stats([{"x": torch.nn.LayerNorm(8)}])


@pytest.mark.parametrize("budget, match", [(0.0, "positive"), (-1.0, "positive"), (math.nan, "positive"),
                                           (16.5, "max_osr"), (0.1, "min_osr")])
def test_bad_budget(budget, match):
    with pytest.raises(ValueError, match=match):
        multi_osr(random_stats(0), budget)


@pytest.mark.parametrize("stat, match", [(LinearStat(0, "a", 10, 0.0), "std"),
                                         (LinearStat(0, "a", 10, -0.1), "std"),
                                         (LinearStat(0, "a", 10, math.inf), "std"),
                                         (LinearStat(0, "a", 0, 0.1), "numel"),
                                         (LinearStat(0, "a", -3, 0.1), "numel"),
                                         (LinearStat(0, "a", 2.5, 0.1), "numel")])
def test_bad_stats(stat, match):
    with pytest.raises(ValueError, match=match):
        multi_osr([stat], 2.0)


def test_empty_and_duplicate_stats_and_bad_grid():
    with pytest.raises(ValueError, match="empty"):
        multi_osr([], 2.0)
    dup = [LinearStat(0, "a", 10, 0.1)] * 2
    with pytest.raises(ValueError, match="duplicate"):
        multi_osr(dup, 2.0)
    with pytest.raises(ValueError, match="step"):
        multi_osr([LinearStat(0, "a", 10, 0.1)], 2.0, step=0.0)
    with pytest.raises(ValueError, match="max_osr"):
        multi_osr([LinearStat(0, "a", 10, 0.1)], 2.0, max_osr=32.0)
