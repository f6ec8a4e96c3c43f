"""sdq: Sigma-Delta quantization of LLM weights to 1 and 1.58 bits, with add-only kernels.

Importing sdq never initialises CUDA; the compiled core is loaded at first use.
"""
from .config import SDQConfig
from .experts import SDQExperts
from .finetune import finetune
from .methods import BaselineConfig, CalibrationWarning
from .methods.sdq import quantize_weight, quantize_weight_calibrated
from .nn import SDQLinear
from .pipeline import quantize_
from .threads import set_thread_backend, thread_backend
from .weight import CheckpointError, QuantizedWeight
from . import hf  # noqa: F401  registers quant_method "sdq" for transformers' from_pretrained

__version__ = "0.1.0"


def has_cuda() -> bool:
    """True when this build of sdq contains the CUDA kernels (says nothing about a GPU being present)."""
    from ._native import core
    return bool(core().has_cuda())


def save(model, directory, tokenizer=None, **kwargs):
    """Write a model quantized by quantize_ to a Hugging Face-style folder (see sdq.io.save)."""
    from .io import save as _save
    return _save(model, directory, tokenizer, **kwargs)


def load(directory, **kwargs):
    """Load a folder written by save(); its SDQLinear modules compute from the packed codes."""
    from .io import load as _load
    return _load(directory, **kwargs)


__all__ = ["SDQConfig", "BaselineConfig", "QuantizedWeight", "SDQLinear", "SDQExperts",
           "CheckpointError", "CalibrationWarning", "quantize_weight",
           "quantize_weight_calibrated", "quantize_", "finetune", "set_thread_backend",
           "thread_backend", "save", "load", "has_cuda", "__version__"]
