"""Input checks shared by every quantizer: clear errors instead of crashes or silent NaNs."""
from __future__ import annotations

import numpy as np
import torch


def as_weight_matrix(W, name: str = "W") -> torch.Tensor:
    """A float32 CPU copy of a 2-D, non-empty, finite, floating-point weight matrix."""
    if isinstance(W, np.ndarray):
        if not np.issubdtype(W.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {W.dtype}")
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(W).__name__}")
    if not W.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)})")
    W = W.detach().to(device="cpu", dtype=torch.float32)
    bad = ~torch.isfinite(W)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN/Inf), first at "
                         f"[{r}, {c}] = {W[r, c].item()}")
    return W.contiguous()
