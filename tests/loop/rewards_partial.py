"""The reward of the partial-rollout loop test, loaded by path: it records every scored sample (its seed and
response) as a JSON line in the file LEAGUES_TEST_RECORD names, so the test sees what each step trained on."""

import json
import os


def record(prompt: str, response: str, label, metadata: dict) -> float:
    if path := os.environ.get("LEAGUES_TEST_RECORD"):
        with open(path, "a") as f:
            f.write(json.dumps({"seed": metadata["seed"], "response": response}) + "\n")
    return 1.0 if response.startswith("1") else 0.0
