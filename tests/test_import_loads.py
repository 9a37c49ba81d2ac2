"""What importing a package actually loads, beside `test_layering.py` (which reads the import statements).

Each package is imported in a fresh process (forked from one interpreter that has loaded torch and nothing else,
so each probe does not pay torch's import again), and the `leagues` units and web-stack modules that import
brought into `sys.modules` are checked: a package loads only units its place in DESIGN.md's table reaches
(its allowed imports, and theirs in turn), so an `__init__` that re-exports something dragging a higher
layer in fails here even when every import statement is allowed. The HTTP server stack (FastAPI, Starlette,
uvicorn, pydantic, prometheus-client) is loaded by none of them: it belongs to `leagues.serve`'s modules,
imported by name when something serves, so the engine core, the RL loop and `leagues --help` do without it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_layering import ALLOWED, ALWAYS_ALLOWED, LEAVES

ROOT = Path(__file__).resolve().parents[1]
HTTP_STACK = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")
PROBE = """
import json, os, sys
import torch, torch.distributed  # once, here: every probe forks from this interpreter
modules, web = json.loads(sys.argv[1]), json.loads(sys.argv[2])
children = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(module)
            units = sorted({m.split(".")[1] for m in sys.modules if m.startswith("leagues.")})
            out = {"units": units, "web": sorted(m for m in web if m in sys.modules)}
        except BaseException as error:
            out = {"error": f"import {module} failed: {error!r}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    children[module] = (pid, read)
result = {}
for module, (pid, read) in children.items():
    with os.fdopen(read) as pipe:
        result[module] = json.loads(pipe.read())
    os.waitpid(pid, 0)
print(json.dumps(result))
"""
# module -> what of the HTTP stack it may load (the CLI's `leagues serve` config holds the request limits,
# which sit beside the pydantic request models)
MODULES = {f"leagues.{unit}": () for unit in ALLOWED if unit != "__init__"} | {
    "leagues": (),
    "leagues.serve.fleet": (),  # the RL loop holds a fleet: no web framework for it
    "leagues.cli.main": ("pydantic",),
}


def reach(unit: str) -> set[str]:
    """Top-level units `unit` may load: itself and, transitively, what the layering table lets it import."""
    seen, todo = set(), [unit]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        allowed = ALLOWED[current] | LEAVES.get(current, ALWAYS_ALLOWED)
        if "*" in allowed:
            return set(ALLOWED)
        todo += [name.split(".")[0] for name in allowed]
    return seen - {"__init__"}


@pytest.fixture(scope="module")
def loaded() -> dict[str, dict]:
    """module -> {"units": leagues units in sys.modules, "web": HTTP-stack modules}, one forked process each."""
    args = [json.dumps(sorted(MODULES)), json.dumps(HTTP_STACK)]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [probe["error"] for probe in out.values() if "error" in probe]
    assert not failed, failed
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_importing_loads_only_lower_layers_and_no_http_server(module, loaded):
    unit = module.split(".")[1] if "." in module else "__init__"
    beyond = set(loaded[module]["units"]) - reach(unit)
    assert not beyond, f"import {module} loads leagues.{sorted(beyond)}, above it in DESIGN.md's table"
    web = set(loaded[module]["web"]) - set(MODULES[module])
    assert not web, f"import {module} loads the HTTP server stack: {sorted(web)}"


def test_the_engine_core_loads_no_http_front(loaded):
    engine = loaded["leagues.engine"]  # `leagues.engine.client` (rollout's way in) runs this `__init__` too
    assert "serve" not in engine["units"] and not engine["web"], engine


def test_reach_follows_the_table():
    assert reach("engine") == {"engine", "model", "kernels", "parallel", "types", "config"}
    assert "serve" in reach("loop") and "loop" not in reach("serve") and "serve" not in reach("engine")
