"""Shared fixtures of the kernel tests.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which @triton.jit reads when
mamlen.kernels.triton is imported (lazily, on first use) — so it is set here, before any test of this
directory runs. It is only set when CUDA is absent: on a GPU machine the same tests run the compiled
kernels on CUDA tensors, and other test files keep compiled Triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamlen import kernels  # noqa: E402  (after TRITON_INTERPRET)


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_param(name):
    marks = []
    if name == "triton" and not triton_available():
        marks.append(pytest.mark.skip(reason="triton is not installed"))
    if name == "cpp" and os.environ.get("MAMLEN_NO_CPP") == "1":
        marks.append(pytest.mark.skip(reason="MAMLEN_NO_CPP=1: the C++ kernels were not built"))
    return pytest.param(name, marks=marks, id=name)


BACKEND_PARAMS = [_backend_param(b) for b in ("reference", "cpp", "triton")]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Each variant; a missing C++ build fails (not skips) the cpp cases unless MAMLEN_NO_CPP=1."""
    if request.param == "cpp":
        assert kernels.CPP_AVAILABLE, f"C++ kernels not loaded: {kernels._dispatch._CPP_ERROR}"
    return request.param


@pytest.fixture
def device(backend):
    """Triton runs on CUDA when present, else interpreted on CPU; the other variants run on CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
