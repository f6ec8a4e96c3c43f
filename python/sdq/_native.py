"""Access to the compiled core. The package imports without it; the first use raises clearly."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def core():
    """The sdq._core extension module."""
    try:
        from . import _core
    except ImportError as e:  # pragma: no cover - only in a broken install
        raise ImportError(
            "sdq's compiled core (sdq._core) is missing: install sdq with `pip install .` "
            f"from a source checkout ({e})") from e
    from .threads import choose_default_backend
    choose_default_backend(_core)
    return _core


def float32_array(t) -> np.ndarray:
    """A CPU tensor as the C-contiguous float32 NumPy array the core's entry points take (the
    tensor's own memory when it already is one)."""
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)
