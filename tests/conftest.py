"""Shared fixtures: the factory's test models (built once per session, cached on disk)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import make_test_model  # noqa: E402


def test_models_dir() -> str:
    return os.environ.get("PROMOE_TEST_MODELS", str(REPO / ".test-models"))


@pytest.fixture(scope="session")
def factory():
    """The test-model factory module (scripts/make_test_model.py)."""
    return make_test_model


@pytest.fixture(scope="session")
def test_models() -> dict:
    """{(arch, quant_name, variant): path} for every model make_test_model.build_models() makes
    (see make_test_model.llama_cpp_loads for the layouts stock llama.cpp refuses)."""
    return make_test_model.build_models(test_models_dir())
