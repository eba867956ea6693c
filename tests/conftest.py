"""Shared pytest configuration for the normflux test suite.

* One intra-op thread per process: the suite runs under ``pytest -n 2`` on small
  machines, and oversubscribed OpenMP threads make small elementwise kernels up to
  ~500x slower (measured: a float32 multiply of 60k elements, 0.02 ms with one thread,
  8.6 ms with two threads on a loaded 2-core box).
* Tests marked ``slow`` (``torch.compile``, long sweeps, fits) are deselected unless a
  marker expression is given (``-m slow``, ``-m "slow or not slow"``) or ``--runslow``.
* Every test starts from the same global seed, so a failure reproduces.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
