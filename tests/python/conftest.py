import os

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("TV_RUN_SLOW") == "1"
    try:
        import tensorvigil._core as core

        has_cuda = bool(getattr(core, "cuda_available", lambda: False)())
    except ImportError:
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set TV_RUN_SLOW=1 to run"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and a CUDA build"))


@pytest.fixture
def tmp_run(tmp_path):
    """Path of a fresh (not yet created) run directory."""
    return str(tmp_path / "run")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
