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

# Test modules whose tests share an expensive module- or session-scoped fixture (`leagues serve` processes, an
# engine process, two served engines, a forked import probe), by group: with several workers (`make test`) each
# group goes to one worker, its tests one after another, so the fixture starts once. Spread over both workers, or
# cut by other modules' tests, a module fixture starts again each time. (`scripted` is one session fixture of two
# modules.)
SHARED_FIXTURE_GROUPS = {
    "tests/serve/test_engine_process.py": "engine-process",
    "tests/serve/test_fleet.py": "fleet",
    "tests/serve/test_fronts.py": "fronts",
    "tests/serve/test_openai_tools.py": "scripted",
    "tests/serve/test_router.py": "router",
    "tests/serve/test_server.py": "server",
    "tests/serve/test_server_robust.py": "server-robust",
    "tests/serve/test_streaming.py": "scripted",
    "tests/sync/test_distributed.py": "sync-distributed",
    "tests/test_import_loads.py": "import-loads",
}


def _shared_fixture_group(nodeid: str) -> str | None:
    return SHARED_FIXTURE_GROUPS.get(nodeid.split("::", 1)[0])


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run first (in their order), then the modules of `SHARED_FIXTURE_GROUPS`, then the rest:
    with several workers (`make test`) the long ones start early and the short ones fill the gaps, instead of a
    long one running alone at the end."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, _shared_fixture_group(item.nodeid) is None))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load scheduling, in the collection's order, except that the tests of a group in
    `SHARED_FIXTURE_GROUPS` go to one worker together (a test alone is its own unit)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _shared_fixture_group(nodeid) or nodeid

    config.option.loadscopereorder = False  # units in the collection's order (slow first), not biggest first
    return SharedFixtureScheduling(config, log)


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-moe")


@pytest.fixture(scope="module")
def engine(tiny_path):
    """The default engine (prefix caching and chunked prefill on, block size 16) with the tiny tokenizer."""
    engine = Engine(tiny_path, num_blocks=256, block_size=16)
    yield engine
    engine.close()
