"""Shared test set-up: deterministic seeds, CPU, and the `gpu` marker."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # pytest-xdist's controller runs no test: its workers start without its torch import
    import torch

    # Tests run in parallel workers on a 2-core machine: one thread each avoids oversubscription,
    # under which OpenMP spin-waiting makes small matmuls a hundred times slower.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    import torch

    torch.manual_seed(0)
    yield
    # A benchmark's main() sets 2 threads for its own timing; the next test in this worker would
    # otherwise inherit them and oversubscribe the cores (measured: a 1.5 s test took 19.7 s).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
