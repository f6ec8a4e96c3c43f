"""Where sdq's parallel CPU work runs: sdq's own thread pool or the caller's OpenMP team.

PyTorch's CPU ops run on an OpenMP team (libgomp on Linux). Beside it, sdq's own pool is a second
set of threads on the same cores: after each torch op its OpenMP worker spins for a while, and
after each sdq call sdq's worker does, so on 2 cores they take turns. On torch's team instead
(the dynamic loader gives sdq's extension the libgomp torch already loaded) a compiled decode
step of a 1.1B model took 25% less time (`bench/generate.py`). So the package, when it loads
its core, picks "openmp" when this build has it and torch's ATen backend is OpenMP, else "pool";
$SDQ_THREAD_BACKEND ("pool" or "openmp") overrides that, and set_thread_backend() changes it
at any time. The C++ API's default is the pool (sdq/threads.h).

OpenMP's limits come with it: libgomp ends the process when it cannot create a thread (a tight
RLIMIT_AS, say), as it would for torch's own ops; a forked child goes back to the pool.
"""
from __future__ import annotations

import os

BACKENDS = ("pool", "openmp")


def _torch_uses_openmp() -> bool:
    import torch
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def choose_default_backend(core) -> None:
    """The backend for a process's first use of the core (see the module's docstring)."""
    choice = os.environ.get("SDQ_THREAD_BACKEND", "").strip()
    if choice:
        if choice not in BACKENDS:  # named here: the error should say where the value came from
            raise ValueError(f"SDQ_THREAD_BACKEND must be one of {BACKENDS}, got {choice!r}")
        core.set_thread_backend(choice)
    elif core.openmp_available() and _torch_uses_openmp():
        core.set_thread_backend("openmp")


def set_thread_backend(name: str) -> None:
    """'pool' (sdq's workers) or 'openmp' (the caller's OpenMP team), process-wide. RuntimeError
    for 'openmp' in a build without OpenMP."""
    from ._native import core
    core().set_thread_backend(name)  # ValueError for a name other than these two


def thread_backend() -> str:
    """The backend parallel work runs on now: 'pool' or 'openmp'."""
    from ._native import core
    return core().thread_backend()
