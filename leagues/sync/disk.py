"""Weights to external engines through a checkpoint on disk: SGLang's `update_weights_from_disk`.

    load_on(fleet_targets, checkpoint_dir, version)       # the RL loop: the engines its fleet chose
    update_from_disk(urls, checkpoint_dir, version, api_key="k")

Where it sits: after a training step of a run whose rollout goes to HTTP engines (`leagues serve`, SGLang),
when the engines share a filesystem with the trainer. The trainer writes an HF checkpoint (the loop's
`write_hf`); `load_from_disk` then asks one engine to load it and stamp later outputs with `version`. The RL
loop calls `load_on` with the engines its fleet says should serve (`leagues.serve.fleet.Fleet.weight_targets`:
quarantined and dead ones skipped, restarted ones caught up) and hands the failures back to the fleet;
`update_from_disk` asks every engine of a list. A router forwards generation, not weight updates, so the URLs
here are the engines themselves.

Decisions:
- Every request carries its engine's headers (the run's key), as generation requests do; a refused key is
  reported as such (`leagues.sync.engine_http`).
- An engine that fails (unreachable: `ConnectionError`; HTTP error or `success: false`: `RuntimeError`) is named
  with its message. `load_on` loads on every target concurrently and returns the failures, so one dead engine
  does not stop the others; `update_from_disk` raises on the first failure, since training on with engines at
  different versions would silently mix policies.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leagues.sync.engine_http import EngineRefused, post
from leagues.types import WeightTarget


def load_from_disk(
    url: str, path: str | Path, version: int, timeout_s: float = 600.0, headers: dict[str, str] | None = None
) -> None:
    """The engine at `url` loads the checkpoint at `path` and serves it as `version`; raises if it does not."""
    body = {"model_path": str(path), "weight_version": version}
    answer = post(url, "/update_weights_from_disk", body, headers=headers, timeout_s=timeout_s)
    if not answer.get("success", False):
        raise EngineRefused(f"{url}: weight update refused: {answer.get('message', answer)}")


def load_on(
    targets: Sequence[WeightTarget], path: str | Path, version: int, timeout_s: float = 600.0
) -> dict[str, Exception]:
    """Every target loads the checkpoint at `path` as `version`, concurrently; the failures by URL (empty: all
    took it)."""
    with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
        futures = {t.url: pool.submit(load_from_disk, t.url, path, version, timeout_s, t.headers) for t in targets}
    return {url: err for url, future in futures.items() if (err := future.exception()) is not None}


def update_from_disk(
    urls: Sequence[str], path: str | Path, version: int, timeout_s: float = 600.0, api_key: str | None = None
) -> None:
    """Every engine of `urls` (behind `api_key`, if given) loads the checkpoint at `path` as `version`,
    concurrently; raises the first failure."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    failures = load_on([WeightTarget(url, headers) for url in urls], path, version, timeout_s)
    if failures:
        raise next(iter(failures.values()))
