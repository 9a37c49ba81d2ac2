"""Shared test setup: a private LEAGUES_HOME so built-in models are made fresh per test session."""

import os
import tempfile

os.environ.setdefault("LEAGUES_HOME", tempfile.mkdtemp(prefix="leagues-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
