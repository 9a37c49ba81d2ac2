"""leagues: reinforcement-learning post-training for Mixture-of-Experts language models.

One model definition is shared by the trainer and the rollout engine; the package table in DESIGN.md
draws the layout. The `leagues` command lives in `leagues.cli`.
"""

__version__ = "0.1.0"
