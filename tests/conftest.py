"""Shared test setup: a private LEAGUES_HOME so built-in models are made fresh per test session, and
Triton kernels run in its interpreter when there is no GPU (it must be set before triton is imported)."""

import os
import shutil
import tempfile

os.environ.setdefault("LEAGUES_HOME", tempfile.mkdtemp(prefix="leagues-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
