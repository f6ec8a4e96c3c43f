"""sdq.ref: plain NumPy/PyTorch references of every core routine, written for clarity.

The tests hold the compiled core to these; the package never imports them at run time.
"""
from .core import *  # noqa: F401,F403  (modulator, FWHT, resampling, bitplanes, quantize_weight)
from .kernels import *  # noqa: F401,F403  (activation transform, add-only GEMM)
from .wgm import *  # noqa: F401,F403  (WGM partition: greedy, windowed, exact DP, cost)
