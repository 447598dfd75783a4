import os
import sys

import pytest

# the harness and the test modules are imported by basename in spawned ranks too (spawn copies sys.path)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
sys.path.insert(0, os.path.dirname(__file__))


def pytest_sessionfinish(session, exitstatus):
    from harness import shutdown_pools

    shutdown_pools()


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (random data every test, reproducible runs)."""
    import torch

    return torch.Generator().manual_seed(1234)
