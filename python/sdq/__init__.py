"""sdq: Sigma-Delta quantization of LLM weights to 1 and 1.58 bits, with add-only kernels.

Importing sdq never initialises CUDA; the compiled core is loaded at first use.
"""
from .config import SDQConfig
from .methods.sdq import quantize_weight
from .weight import QuantizedWeight

__version__ = "0.1.0"


def has_cuda() -> bool:
    """True when this build of sdq contains the CUDA kernels (says nothing about a GPU being present)."""
    from ._native import core
    return bool(core().has_cuda())


__all__ = ["SDQConfig", "QuantizedWeight", "quantize_weight", "has_cuda", "__version__"]
