"""The engine client protocol over a `Fleet`: how the RL loop rolls out on external engines.

    client = FleetClient(Fleet(["http://a:30000", "http://b:30000"], FleetConfig()))
    outputs = await client.generate(prompt_ids, params)   # on a healthy engine, retried on another if it fails

Where it sits: `leagues train --engine_urls` builds one (`leagues.loop.run`) and hands it to rollout as its
`EngineClient`; the weight updates go through the same fleet (`Fleet.weight_targets`, `Fleet.weights_updated`), so
requests and weights agree on which engines serve.

Decisions:
- Bodies and answers are the HTTP client's (`leagues.engine.client.generate_body`, `outputs_of`): a sample
  carries the same fields whichever client made it.
- A request the fleet had to send again (its engine died or answered 5xx) counts its `params.n` samples in
  `num_retried` (the loop reports the step's as `rollout/retried`); one that failed on every engine tried
  raises `ConnectionError` (a 4xx: `ValueError`, the request's fault), so rollout marks those samples failed.
- The fleet's health checks start with the first request, on the rollout's event loop.
"""

from leagues.engine.client import generate_body, outputs_of, replay_tokens
from leagues.engine.output import Output
from leagues.engine.requests import TokenCallback
from leagues.serve.fleet import Fleet
from leagues.types import SamplingParams


class FleetClient:
    """Engines of a `Fleet` as one `EngineClient`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.num_retried = 0
        """Samples whose request was sent again to another engine, since the client was made."""

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Output]:
        self.fleet.start()
        answer = await self.fleet.forward("/generate", generate_body(prompt_ids, params, request_id))
        if answer.attempts > 1:
            self.num_retried += params.n
        if answer.status >= 400:
            error = answer.body.get("error") if isinstance(answer.body, dict) else None
            message = error.get("message", error) if isinstance(error, dict) else error or answer.body
            raise (ValueError if answer.status < 500 else ConnectionError)(
                f"generation failed: HTTP {answer.status}: {message}"
            )
        return replay_tokens(outputs_of(answer.body, prompt_ids), on_token)

    async def abort(self, request_id: str) -> None:
        """`/abort_request` to every healthy engine (the one serving the request aborts it), best effort."""
        await self.fleet.post_all("/abort_request", {"rid": request_id})

    async def weight_version(self) -> int | None:
        return self.fleet.weight_version

    async def aclose(self) -> None:
        await self.fleet.close()
