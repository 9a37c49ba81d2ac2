"""Weights to external engines through a checkpoint on disk: SGLang's `update_weights_from_disk`.

Where it sits: after a training step of a run whose rollout goes to HTTP engines (`leagues serve`, SGLang),
when the engines share a filesystem with the trainer. The trainer writes an HF checkpoint (the loop's
`write_hf`); `load_from_disk` then asks one engine to load it and stamp later outputs with `version`. The RL
loop calls it for each engine its fleet says should serve (`leagues.serve.fleet.Fleet.update_weights`: it
skips quarantined engines and catches restarted ones up); `update_from_disk` asks every engine of a list.
A router forwards generation, not weight updates, so the URLs here are the engines themselves.

Decisions: an engine that fails (unreachable: `ConnectionError`; HTTP error or `success: false`:
`RuntimeError`) raises naming its URL and message. `update_from_disk` updates its engines concurrently and
raises on the first failure, since training on with engines at different versions would silently mix policies.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def load_from_disk(url: str, path: str | Path, version: int, timeout_s: float = 600.0) -> None:
    """The engine at `url` loads the checkpoint at `path` and serves it as `version`; raises if it does not."""
    body = {"model_path": str(path), "weight_version": version}
    try:
        response = httpx.post(url.rstrip("/") + "/update_weights_from_disk", json=body, timeout=timeout_s)
    except httpx.TransportError as e:
        raise ConnectionError(f"{url}: weight update failed: {type(e).__name__}: {e}") from None
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code >= 400 or not data.get("success", False):
        raise RuntimeError(f"{url}: weight update refused: HTTP {response.status_code}: {response.text[:300]}")


def update_from_disk(urls: list[str], path: str | Path, version: int, timeout_s: float = 600.0) -> None:
    """Every engine of `urls` loads the checkpoint at `path` as `version`, concurrently; raises on a failure."""
    with ThreadPoolExecutor(max_workers=max(len(urls), 1)) as pool:
        for future in [pool.submit(load_from_disk, url, path, version, timeout_s) for url in urls]:
            future.result()
