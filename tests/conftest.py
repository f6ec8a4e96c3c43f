import numpy as np
import pytest
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def exact_cpu_gemm_session():
    """Eager CPU layer calls run the exact add-only GEMM in tests, whose references are float
    computations (dequantized matmuls, other dtypes, outputs saved by module-scoped fixtures):
    the default int8-table GEMMs add about 1% relative output error. Session-wide, so that
    fixtures of every scope compute on the exact kernel too."""
    from sdq import ops
    previous = ops.set_cpu_gemm("addonly")
    yield
    ops.set_cpu_gemm(previous)


@pytest.fixture(autouse=True)
def int8_tables_when_marked(request):
    """Tests of the default path opt in with @pytest.mark.int8_tables."""
    from sdq import ops
    if not request.node.get_closest_marker("int8_tables"):
        yield
        return
    previous = ops.set_cpu_gemm("auto")
    yield
    ops.set_cpu_gemm(previous)
