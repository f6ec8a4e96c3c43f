"""The paper's normalisation of up-sampled rows (method.md step 3), shared by both code selections.

Both the modulator path (sdq.py) and the Gram-matrix path (gram.py) start from the same z; keeping
it here lets the imports flow one way: sdq.py -> gram.py -> normalise.py.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import SDQConfig

# The largest finite fp16: scales and means are stored in fp16, so they must fit.
FP16_MAX = 65504.0


def quantile_lastdim(x: torch.Tensor, p: float) -> torch.Tensor:
    """numpy's default 'linear' quantile along the last axis (torch.quantile caps its input size)."""
    if x.device.type == "cpu":  # numpy sorts rows of a few hundred values ~10x faster than torch
        v = torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))
    else:
        v, _ = torch.sort(x, dim=-1)
    pos = p * (x.shape[-1] - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, x.shape[-1] - 1)
    frac = pos - lo
    return v[..., lo] + (v[..., hi] - v[..., lo]) * frac


def normalise(u: torch.Tensor, cfg: SDQConfig):
    """Step 3 on float64 rows u: fp16 mean and scale (rounded before use, exactly as stored), z."""
    mu = u.mean(dim=1).half()
    dev = (u - mu.double()[:, None]).abs()
    s = (quantile_lastdim(dev, cfg.p_scale) * cfg.sd_scale).half()
    if not (torch.isfinite(mu).all() and torch.isfinite(s).all()):
        raise ValueError(f"weights too large for the fp16 scale and mean (|value| must stay "
                         f"below {FP16_MAX:g} after rotation and resampling)")
    s_safe = torch.where(s.double() > 0, s.double(), torch.ones((), dtype=torch.float64))
    z = (u - mu.double()[:, None]) / s_safe[:, None]
    return z, s, mu
