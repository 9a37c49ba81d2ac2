"""Named runs: each recipe is a Python function returning the settings of one run.

Where it sits: `leagues <verb> --recipe NAME` builds the verb's config from `get_recipe(NAME)`, then
applies dotted overrides; the resolved config is what gets printed or dumped as YAML.

Decisions:
- Recipes are plain functions in one registry dict, not YAML files: they can compute values and share
  pieces, and `--config run.yaml` already covers loading a resolved run back.
- For now a recipe returns plain nested data (`RunConfig`, a dict), which the CLI checks with
  `leagues.config.from_dict` against the verb's config class, so a wrong key still fails naming it.
  The reason: today's only job is generation, whose `GenerateConfig` lives in `leagues/cli/generate.py`,
  and `recipes` may not import `cli` (tests/test_layering.py). When the RL run's root config exists
  (in `loop/`), recipes return it typed.
"""

from collections.abc import Callable
from typing import Any, TypeAlias

RunConfig: TypeAlias = dict[str, Any]


def tiny_generate() -> RunConfig:
    """Greedy continuation from the built-in tiny MoE on the CPU: the smoke test of the whole stack."""
    return {"model": "tiny-moe", "prompt": "The quick brown fox", "max_new_tokens": 32, "temperature": 0.0}


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny-generate": tiny_generate,
}


def get_recipe(name: str) -> RunConfig:
    """The settings of recipe `name`; an unknown name raises `ValueError` listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()
