"""Shared test setup: a private LEAGUES_HOME so built-in models are made fresh per test session, Triton
kernels in its interpreter when there is no GPU (set before triton is imported), slow tests first, and the tiny
engine a test module shares (`engine`, `tiny_path`)."""

import os
import shutil
import tempfile

os.environ.setdefault("LEAGUES_HOME", tempfile.mkdtemp(prefix="leagues-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (the environment above must be set before anything imports triton)

from leagues.engine import Engine  # noqa: E402
from leagues.model import resolve_model_path  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run first (in their order): with several workers (`make test`) the long ones start early
    and the short ones fill the gaps, instead of a long one running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-moe")


@pytest.fixture(scope="module")
def engine(tiny_path):
    """The default engine (prefix caching and chunked prefill on, block size 16) with the tiny tokenizer."""
    engine = Engine(tiny_path, num_blocks=256, block_size=16)
    yield engine
    engine.close()
