"""Engines shared by the tests of one module: the built-in tiny MoE, loaded once, closed at the end."""

import pytest

from leagues.engine import Engine
from leagues.model import resolve_model_path


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-moe")


@pytest.fixture(scope="module")
def engine(tiny_path):
    """The default engine (prefix caching and chunked prefill on, block size 16) with the tiny tokenizer."""
    engine = Engine(tiny_path, num_blocks=256, block_size=16)
    yield engine
    engine.close()
