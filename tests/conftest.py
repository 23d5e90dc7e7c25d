"""Shared fixtures: the factory's test models (built once per session, cached on disk)."""
import os
from pathlib import Path

import pytest
import torch

from promoe_gguf.testing import factory as make_test_model

REPO = Path(__file__).resolve().parent.parent

# Test models are tiny: per-op threading overhead dwarfs the work, and 2 threads on a loaded 2-core
# machine slow small ops down by 10-100x.
torch.set_num_threads(1)


def test_models_dir() -> str:
    return os.environ.get("PROMOE_TEST_MODELS", str(REPO / ".test-models"))


@pytest.fixture(scope="session")
def factory():
    """The test-model factory module (promoe_gguf/testing/factory.py)."""
    return make_test_model


@pytest.fixture(scope="session")
def test_models() -> dict:
    """{(arch, quant_name, variant): path} for every model make_test_model.build_models() makes
    (see make_test_model.llama_cpp_loads for the layouts stock llama.cpp refuses)."""
    return make_test_model.build_models(test_models_dir())


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (the 10,000-case fuzz runs) run only when asked for: pytest -m slow."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (see README)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
