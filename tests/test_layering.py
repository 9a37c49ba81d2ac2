"""Enforces DESIGN.md's package table: imports inside `leagues/` point down and inward, never up or sideways.

Every `.py` under `leagues/` is parsed with `ast` (nothing is imported, so the check is cheap and works
before the code does), every `leagues.*` import is resolved to an absolute name (relative ones included,
and imports inside functions and `if TYPE_CHECKING:` too: a type-only import is still a dependency), and
its top-level unit (`model`, `engine.client`, ...) is checked against `ALLOWED` below.

A top-level module or package missing from the table fails the test: a new package must decide its
place in the architecture (here and in DESIGN.md) before it lands. Packages that don't exist yet are
simply not visited.
"""

import ast
import textwrap
from pathlib import Path

LEAGUES_ROOT = Path(__file__).resolve().parents[1] / "leagues"
EVERYTHING = frozenset({"*"})

# What each top-level unit of `leagues` may import, as DESIGN.md's table says. Beyond these, every
# unit may import itself and the root `leagues/__init__.py`, and every unit except the leaves in LEAVES may
# import `types` and `config` (the records that cross packages, and the config machinery, which imports nothing).
ALLOWED: dict[str, frozenset[str]] = {
    "__init__": frozenset(),  # `import leagues` stays light (types and config at most), so anyone may import it
    "types": frozenset(),
    "config": frozenset(),
    "model": frozenset({"kernels"}),
    "kernels": frozenset(),
    "parallel": frozenset({"model"}),
    "engine": frozenset({"model", "kernels", "parallel"}),  # never `serve`: the core knows no HTTP front
    "train": frozenset({"model", "kernels", "parallel"}),
    "sync": frozenset({"model"}),
    "rollout": frozenset({"engine.client"}),  # the engine client protocol only, never the engine itself
    "agent": frozenset({"rollout", "engine.client"}),
    "serve": frozenset({"engine", "agent"}),  # the HTTP front over the engine core; agent sessions
    # "Everything above" in the table: the loop composes all packages but is itself driven by cli/recipes.
    "loop": frozenset({"model", "kernels", "parallel", "engine", "serve", "train", "sync", "rollout", "agent", "obs"}),
    "obs": frozenset(),
    "recipes": frozenset(
        {"model", "kernels", "parallel", "engine", "serve", "train", "sync", "rollout", "agent", "loop", "obs"}
    ),
    "cli": EVERYTHING,
}
# DESIGN.md says these import nothing; config (which itself imports nothing) is their only exception.
LEAVES: dict[str, frozenset[str]] = {
    "types": frozenset({"__init__", "config"}),
    "kernels": frozenset({"__init__", "config"}),
    "obs": frozenset({"__init__", "config"}),
    "config": frozenset({"__init__"}),
}
ALWAYS_ALLOWED = frozenset({"__init__", "types", "config"})


def module_name(file: Path, root: Path) -> tuple[str, bool]:
    """Dotted module name of `file` under the package directory `root`, and whether it is a package."""
    parts = file.relative_to(root).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join((root.name, *parts)), is_package


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every absolute name the module imports, with its line; `from m import x` yields `m.x`."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [(node.lineno, base if a.name == "*" else f"{base}.{a.name}") for a in node.names]
    return names


def unit_of(name: str, root_name: str) -> str | None:
    """`leagues.engine.client.X` -> `engine.client.X`; `leagues`, `leagues.__version__` -> `__init__`;
    names outside the root package -> None."""
    parts = name.split(".")
    if parts[0] != root_name:
        return None
    if len(parts) == 1 or parts[1] not in ALLOWED:
        return "__init__"  # the root package itself or an attribute of its __init__.py
    return ".".join(parts[1:])


def allows(source: str, target: str) -> bool:
    """Whether top-level unit `source` may import the dotted `target` (relative to the root package)."""
    allowed = ALLOWED[source] | LEAVES.get(source, ALWAYS_ALLOWED) | {source}
    return "*" in allowed or any(target == a or target.startswith(a + ".") for a in allowed)


def find_violations(root: Path) -> list[str]:
    """`file:line imports X` for every forbidden import, and one line per unit missing from ALLOWED."""
    violations = []
    for file in sorted(root.rglob("*.py")):
        source = file.relative_to(root).with_suffix("").parts[0]
        if source not in ALLOWED:
            violations.append(f"{file}: top-level unit '{source}' is not in the layering table")
            continue
        module, is_package = module_name(file, root)
        tree = ast.parse(file.read_text(), filename=str(file))
        for line, name in imported_names(tree, module, is_package):
            target = unit_of(name, root.name)
            if target is not None and not allows(source, target):
                violations.append(f"{file}:{line} imports {name}")
    return violations


def test_leagues_respects_the_layering_table():
    violations = find_violations(LEAGUES_ROOT)
    assert not violations, "imports against DESIGN.md's package table:\n" + "\n".join(violations)


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_checker_catches_forbidden_imports(tmp_path):
    root = tmp_path / "leagues"
    _write_tree(
        root,
        {
            "__init__.py": "from leagues.types import Sample\n",
            "types.py": "import torch\nfrom leagues import __version__\n",
            "model/__init__.py": "from .attention import Attention\n",
            "model/attention.py": "from leagues.kernels import paged\nfrom ..types import Sample\n",
            "model/moe.py": "from leagues.config import X\nfrom ..parallel import mesh\n",
            "kernels/paged.py": "def f():\n    import leagues.model.attention\n",
            "rollout/client.py": "from leagues.engine.client import EngineClient\nfrom leagues.engine import Engine\n",
            "obs/metrics.py": "from leagues import types\n",
            "engine/runner.py": "from . import scheduler\nfrom leagues.train.loss import grpo\n",
            "newpkg/x.py": "",
        },
    )
    violations = [v.replace(str(root) + "/", "") for v in find_violations(root)]
    assert violations == [
        "engine/runner.py:2 imports leagues.train.loss.grpo",
        "kernels/paged.py:2 imports leagues.model.attention",
        "model/moe.py:2 imports leagues.parallel.mesh",
        "newpkg/x.py: top-level unit 'newpkg' is not in the layering table",
        "obs/metrics.py:1 imports leagues.types",
        "rollout/client.py:2 imports leagues.engine.Engine",
    ]


def test_relative_imports_resolve_to_absolute_names():
    tree = ast.parse("from . import a\nfrom .b import c\nfrom ..types import Sample\nfrom .. import config\n")
    assert imported_names(tree, "leagues.model.moe", is_package=False) == [
        (1, "leagues.model.a"),
        (2, "leagues.model.b.c"),
        (3, "leagues.types.Sample"),
        (4, "leagues.config"),
    ]
    tree = ast.parse("from . import moe\n")
    assert imported_names(tree, "leagues.model", is_package=True) == [(1, "leagues.model.moe")]
