"""The stored scale and mean of a row-block, chosen for the weighted error they leave.

For fixed codes the decoded block is s a + mu (a = q D^T, rotated, padded), and its weighted error
E(s, mu) = (s a + mu - w) C (s a + mu - w)^T is a quadratic in (s, mu) whose five coefficients per
row (a.a, a.1, 1.1, a.w, 1.w in the C inner product, plus w.w) are computed once: every candidate
(s, mu) then costs O(1) per row. gram.refit_scale_mean gives the continuous optimum; the stored
values are fp16, and rounding each of s and mu to its nearest fp16 separately is not the best
fp16 pair along a correlated quadratic. best_fp16 checks the fp16 neighbours of the optimum
(the nearest, one step down and one step up, for both) and keeps the pair with the smallest
error; the nearest pair is among them, so it is never worse than rounding the closed form.
"""
from __future__ import annotations

import torch

from .normalise import FP16_MAX


class Quadratic:
    """E(s, mu) per row for fixed decoded codes a [n, p] and targets w [n, p] under C (None:
    identity), in float64."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, C: torch.Tensor | None,
                 wC: torch.Tensor | None = None):
        """wC: w @ C if already known (it does not change with the codes). C is symmetric, so
        the constant's terms need only C's column sums: one [n, p] @ [p, p] product per call."""
        a, w = a.double(), w.double()
        if C is None:
            Ca, wC, c1 = a, w, torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
        else:
            Ca, c1 = a @ C, C.sum(0)
            wC = w @ C if wC is None else wC
        self.aa, self.a1, self.one1 = (Ca * a).sum(1), Ca.sum(1), c1.sum().expand(a.shape[0])
        self.aw, self.w1, self.ww = (Ca * w).sum(1), w @ c1, (wC * w).sum(1)

    def error(self, s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        s, mu = s.double(), mu.double()
        return (s * s * self.aa + 2 * s * mu * self.a1 + mu * mu * self.one1
                - 2 * s * self.aw - 2 * mu * self.w1 + self.ww)


def _fp16_neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """The nearest fp16 of x and the fp16 values one step below and above it (finite only: an
    infinite neighbour is replaced by the nearest), as float64."""
    near = x.half()
    inf = torch.tensor(float("inf"), dtype=torch.float16, device=x.device)
    out = [near.double()]
    for toward in (-inf, inf):
        step = torch.nextafter(near, toward)
        out.append(torch.where(step.abs() <= FP16_MAX, step, near).double())
    return out


def best_fp16(quad: Quadratic, s: torch.Tensor, mu: torch.Tensor):
    """(s, mu) fp16 [n]: of the 3 x 3 fp16 neighbours of (s, mu), the pair with the smallest
    quad.error per row (ties: the nearest pair). s and mu must fit in fp16."""
    best_s, best_mu = s.half(), mu.half()
    best = quad.error(best_s, best_mu)
    for cs in _fp16_neighbours(s):
        for cm in _fp16_neighbours(mu):
            e = quad.error(cs, cm)
            better = e < best
            best = torch.where(better, e, best)
            best_s = torch.where(better, cs.half(), best_s)
            best_mu = torch.where(better, cm.half(), best_mu)
    return best_s, best_mu
