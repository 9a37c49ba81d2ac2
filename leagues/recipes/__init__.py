"""Named runs: each recipe is a Python function returning the settings of one run.

Where it sits: `leagues <verb> --recipe NAME` builds the verb's config from `get_recipe(NAME)`, then
applies dotted overrides; the resolved config is what gets printed or dumped as YAML.

Decisions:
- Recipes are plain functions in one registry dict, not YAML files: they can compute values and share
  pieces, and `--config run.yaml` already covers loading a resolved run back.
- A recipe returns plain nested data (`RunConfig`, a dict), which the CLI checks with
  `leagues.config.from_dict` against the verb's config class, so a wrong key still fails naming it, and
  one registry serves every verb (`GenerateConfig` lives in `cli/`, which `recipes` may not import).
"""

from collections.abc import Callable
from typing import Any, TypeAlias

RunConfig: TypeAlias = dict[str, Any]


def tiny_generate() -> RunConfig:
    """Greedy continuation from the built-in tiny MoE on the CPU: the smoke test of the whole stack."""
    return {"model": "tiny-moe", "prompt": "The quick brown fox", "max_new_tokens": 32, "temperature": 0.0}


def tiny_arithmetic() -> RunConfig:
    """The main job (`make run`): the built-in tiny MoE, a short SFT warm start on 1-2 digit sums and
    differences (about 27% held-out greedy accuracy), then 500 GRPO steps with a cosine learning rate and
    held-out accuracy every 50 steps. About 4 minutes on a 2-core CPU."""
    return {
        "model": "tiny-moe",
        "task": "arithmetic",
        "warm_start": {"steps": 1000, "batch_size": 64, "lr": 3e-3},
        "steps": 500,
        "rollout": {"batch_size": 64, "n_samples_per_prompt": 8, "max_response_len": 8, "temperature": 1.0},
        "trainer": {
            "optim": {"lr": 1e-3, "schedule": "cosine", "min_lr_ratio": 0.1},
            "loss": {"eps_clip_high": 0.28},
        },
        "eval": {"every": 50, "num_prompts": 1024},
        "checkpoint": {"every": 100},
        "obs": {"tensorboard": True},
    }


def tiny_arithmetic_ppo() -> RunConfig:
    """`tiny-arithmetic` with PPO and a learned critic instead of GRPO: the same warm start and policy settings,
    per-token GAE advantages (gamma 1, lambda 0.95) from a value model started from the warm-started policy, with
    its own learning rate, trained alone for the first 10 steps."""
    run = tiny_arithmetic()
    run["advantage"] = {"estimator": "gae", "gamma": 1.0, "lam": 0.95}
    run["critic"] = {
        "optim": {"lr": 1e-3, "schedule": "cosine", "min_lr_ratio": 0.1},
        "value_clip": 0.5,
        "warmup_steps": 10,
    }
    return run


def tiny_lookup() -> RunConfig:
    """Multi-turn with a tool on the CPU: the tiny MoE, an SFT warm start of 500 steps on demonstrations (one
    per episode: call `lookup(key)`, then answer with the value the tool gave), then 40 GRPO steps on
    episodes of the `lookup` task (a random table per episode, reachable only through the tool; 1-digit
    values, so the no-tool control, `--task_params '{value_digits: 1, tools: false}'`, scores about 10%)."""
    return {
        "model": "tiny-moe",
        "task": "lookup",
        "task_params": {"value_digits": 1},
        "warm_start": {"steps": 500, "batch_size": 32, "lr": 3e-3},
        "steps": 40,
        "rollout": {"batch_size": 8, "n_samples_per_prompt": 8, "max_response_len": 80, "temperature": 1.0},
        "agent": {"max_turns": 2, "max_tokens": 512},
        "trainer": {"optim": {"lr": 2e-4, "schedule": "cosine", "min_lr_ratio": 0.1}},
        "eval": {"every": 10, "num_prompts": 64},
        "checkpoint": {"enabled": False},
        "obs": {"tensorboard": False},
    }


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny-generate": tiny_generate,
    "tiny-arithmetic": tiny_arithmetic,
    "tiny-arithmetic-ppo": tiny_arithmetic_ppo,
    "tiny-lookup": tiny_lookup,
}


def get_recipe(name: str) -> RunConfig:
    """The settings of recipe `name`; an unknown name raises `ValueError` listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()
