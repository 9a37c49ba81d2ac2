"""The engine client protocol over a `Fleet`: how the RL loop rolls out on external engines.

    client = FleetClient(Fleet(["http://a:30000", "http://b:30000"], FleetConfig()))
    outputs = await client.generate(prompt_ids, params)   # on a healthy engine, retried on another if it fails

Where it sits: `leagues train --engine_urls` builds one (`leagues.loop.run`) and hands it to rollout as its
`EngineClient`; the weight updates go through the same fleet (`Fleet.weight_targets`, `Fleet.weights_updated`), so
requests and weights agree on which engines serve.

Decisions:
- It is a `RemoteClient` (`leagues.engine.client`), like the plain HTTP client: bodies, answers, errors and the
  retried count are theirs, so a sample carries the same fields whichever client made it. Only the sending is
  the fleet's (`Fleet.forward`: health, quarantine, retries on another engine).
- A request the fleet had to send again (its engine died or answered 5xx) counts its `params.n` samples in
  `num_retried`; one that failed on every engine tried raises `ConnectionError` (a 4xx: `ValueError`, the
  request's fault), so rollout marks those samples failed.
- The fleet's health checks start with the first request, on the rollout's event loop.
"""

from typing import Any

from leagues.engine.client import RemoteClient, request_error
from leagues.serve.fleet import Fleet


class FleetClient(RemoteClient):
    """Engines of a `Fleet` as one `EngineClient`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.num_retried = 0

    async def _send(self, body: dict, num_samples: int) -> Any:
        self.fleet.start()
        answer = await self.fleet.forward("/generate", body)
        if answer.attempts > 1:
            self.num_retried += num_samples
        if answer.status >= 400:
            raise request_error(answer.status, answer.body, "generation failed: ")
        return answer.body

    async def abort(self, request_id: str) -> None:
        """`/abort_request` to every healthy engine (the one serving the request aborts it), best effort."""
        await self.fleet.post_all("/abort_request", {"rid": request_id})

    async def weight_version(self) -> int | None:
        return self.fleet.weight_version

    async def aclose(self) -> None:
        await self.fleet.close()
