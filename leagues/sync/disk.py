"""Weights to external engines through a checkpoint on disk: SGLang's `update_weights_from_disk`.

Where it sits: after a training step of a run whose rollout goes to HTTP engines (`leagues serve`, SGLang),
when the engines share a filesystem with the trainer. The trainer writes an HF checkpoint (the loop's
`write_hf`); `update_from_disk` then asks every engine to load it and stamp later outputs with `version`.
A router forwards generation, not weight updates, so the URLs here are the engines themselves.

Decisions: engines are updated concurrently; one that fails (HTTP error or `success: false`) raises naming
its URL and message, since training on with engines at different versions would silently mix policies.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def update_from_disk(urls: list[str], path: str | Path, version: int, timeout_s: float = 600.0) -> None:
    def one(url: str) -> None:
        body = {"model_path": str(path), "weight_version": version}
        try:
            response = httpx.post(url.rstrip("/") + "/update_weights_from_disk", json=body, timeout=timeout_s)
        except httpx.TransportError as e:
            raise ConnectionError(f"{url}: weight update failed: {type(e).__name__}: {e}") from None
        data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code >= 400 or not data.get("success", False):
            raise RuntimeError(f"{url}: weight update refused: HTTP {response.status_code}: {response.text[:300]}")

    with ThreadPoolExecutor(max_workers=max(len(urls), 1)) as pool:
        for future in [pool.submit(one, url) for url in urls]:
            future.result()
