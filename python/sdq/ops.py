"""Add-only inference ops. Placeholder until the kernels are wired: nothing is supported yet."""
from __future__ import annotations

import torch


def supports(x: torch.Tensor) -> bool:
    return False


def sdq_linear(module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    raise NotImplementedError
