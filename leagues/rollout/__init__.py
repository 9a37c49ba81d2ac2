"""Rollout: prompt datasets and formatting, built-in tasks (data plus reward), and reward scoring
(verifiers, user functions, a remote reward model). Generate functions, filters and engine clients join
this package; it reaches the engine only through `leagues.engine.client`, and the tokenizer is handed in.

from leagues.rollout import DataConfig, PromptIterator, RewardConfig, RewardScorer, load_prompts
dataset = load_prompts(DataConfig(path="prompts.jsonl"), tokenizer)
batch = PromptIterator(dataset, seed=0).next_batch(8)
stats = RewardScorer(RewardConfig(name="math")).score_sync(samples)
"""

from leagues.rollout.data import DataConfig, Prompt, PromptDataset, PromptIterator, format_prompt, load_prompts
from leagues.rollout.rewards import REWARDS, RewardConfig, RewardError, RewardScorer, RewardStats, score, score_sync
from leagues.rollout.tasks import TASKS, Task, make_task, task_dataset, write_task_data

__all__ = [
    "REWARDS",
    "TASKS",
    "DataConfig",
    "Prompt",
    "PromptDataset",
    "PromptIterator",
    "RewardConfig",
    "RewardError",
    "RewardScorer",
    "RewardStats",
    "Task",
    "format_prompt",
    "load_prompts",
    "make_task",
    "score",
    "score_sync",
    "task_dataset",
    "write_task_data",
]
