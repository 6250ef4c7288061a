"""Shared setup of the pytest-benchmark suites in bench/ (test_kernels.py, test_meta_step.py).

    pytest bench --benchmark-only                 timed, full sizes (`make bench`)
    pytest bench --benchmark-disable              every case once, untimed, at small sizes (CI, in `make test`)

bench/README.md shows how to save a baseline and fail on a regression against it.
"""
import pytest


@pytest.fixture(scope="session")
def timed(request) -> bool:
    """False under --benchmark-disable: each case runs once as a plain test, so small inputs suffice."""
    return not (request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"))
