"""Rewards of the rollout tests (loaded by path as `tests/rollout/rewards_for_rollout.py:NAME`)."""


def by_prompt(prompt: str, response: str, label, metadata: dict) -> float:
    """Every sample of a group gets the same reward (zero variance) unless the label says "mixed"."""
    if label == "mixed":
        return float(metadata["seed"] % 2)
    return 1.0
