"""Tests of leagues.rollout: data, tasks, rewards."""
