"""HessianAccumulator shares one x^T x between Linears fed the same tensor (q/k/v, gate/up), and
its Hessians equal the per-Linear sums whatever the Linears are fed."""
import torch
from torch import nn

from sdq.traversal import HessianAccumulator


class _Fanout(nn.Module):
    """q, k, v read one input (like attention); o reads another. `diverge` feeds v a different
    tensor from the given call on (sharing must then split, exactly)."""

    def __init__(self, diverge_at: int | None = None, stop_after_q: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(6, 5)
        self.o = nn.Linear(4, 6)
        self.diverge_at, self.stop_after_q, self.calls = diverge_at, stop_after_q, 0
        self.seen: dict[str, list[torch.Tensor]] = {n: [] for n in "qkvo"}

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.seen[name].append(x.reshape(-1, x.shape[-1]).clone())
        return getattr(self, name)(x)

    def forward(self, x):
        self.calls += 1
        q = self._run("q", x)
        if self.stop_after_q and self.calls == 2:
            return q
        k = self._run("k", x)
        v_in = x * 2 if self.diverge_at is not None and self.calls >= self.diverge_at else x
        self._run("v", v_in)
        return self._run("o", q + k.sum(-1, keepdim=True))

    def reference(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, xs in self.seen.items():
            X = torch.cat(xs)
            out[name] = 2 * X.T @ X / X.shape[0]
        return out


def _accumulate(module: _Fanout, calls: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with HessianAccumulator(module) as acc:
        for _ in range(calls):
            module(torch.randn(2, 7, 6, generator=gen))
    return acc.hessians()


def test_shared_inputs_share_one_hessian():
    module = _Fanout()
    got = _accumulate(module)
    assert got["q"] is got["k"] and got["k"] is got["v"]  # one sum for the three
    assert got["o"] is not got["q"]
    for name, ref in module.reference().items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5)


def test_diverging_inputs_split_exactly():
    module = _Fanout(diverge_at=2)
    got = _accumulate(module)
    assert got["v"] is not got["q"]  # the group split (into one sum per Linear)
    for name, ref in module.reference().items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5)


def test_forward_stopped_between_group_mates():
    module = _Fanout(stop_after_q=True)
    got = _accumulate(module)
    ref = module.reference()
    assert module.seen["q"][0].shape[0] * 3 == sum(x.shape[0] for x in module.seen["q"])
    assert sum(x.shape[0] for x in module.seen["k"]) == 2 * 14  # k missed the second call
    for name in "qkvo":
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5)
