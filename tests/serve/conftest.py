"""Fixtures of the serve tests: the tiny MoE at two weight versions, two engine processes (fleet and router), and
a served scripted model (tool calls, reasoning, streaming)."""

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.serve.engines import EngineServer, free_port
from tests.serve.scripted import serve, write_scripted_model


@pytest.fixture(scope="module")
def checkpoints():
    """The tiny MoE (weights v0) and a second tiny checkpoint (other weights, served as version 1)."""
    from leagues.model import resolve_model_path, write_tiny_moe

    with tempfile.TemporaryDirectory(prefix="fleet-test-") as tmp:
        yield resolve_model_path("tiny-moe"), write_tiny_moe(Path(tmp) / "tiny-seed1", seed=1), Path(tmp)


@pytest.fixture(scope="module")
def replicas(checkpoints):
    """Two engine processes on the tiny MoE behind an API key, started together; killed at the end of the module."""
    tiny, _, tmp = checkpoints
    engines = [EngineServer(tiny, free_port(), tmp).start() for _ in range(2)]
    try:
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.stop()


@pytest.fixture(scope="session")
def scripted(tmp_path_factory):
    """`leagues serve` of the scripted model (`tests/serve/scripted.py`): (its URL, its tokenizer)."""
    from leagues.model import load_tokenizer

    path = tmp_path_factory.mktemp("scripted")
    write_scripted_model(path)
    proc, url = serve(path)
    yield url, load_tokenizer(path)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
