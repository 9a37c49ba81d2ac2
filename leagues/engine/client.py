"""Engine clients: the one protocol rollout code generates through, in-process or over HTTP.

    client = LocalClient(engine)                        # the engine in this process
    client = HTTPClient(["http://host:30000"])          # `leagues serve`, a `leagues router`, or SGLang
    client = FleetClient(Fleet(urls))                   # the RL loop's external engines (`leagues.serve`)
    outputs = await client.generate(prompt_ids, params) # params.n outputs of one prompt

Where it sits: `leagues.rollout` reaches engines only through this module (DESIGN.md's layering), so the
same generate functions run against the built-in engine, a fleet behind the router, or an external SGLang
server. Every client returns the engine's `Output` records (tokens, logprobs, finish reason, weight version,
routed experts), so a sample carries the same fields whichever way it was generated.

Decisions:
- HTTP speaks SGLang's native `/generate` with `input_ids` (tokenisation stays on the rollout side, so the
  trainer sees the exact ids that were sampled) and `return_logprob`; routed experts come back base64 as
  SGLang encodes them. Several URLs are used round-robin; a router URL is just one URL. Health checks,
  quarantine and rejoin at the current weights are the fleet's (`leagues.serve.fleet_client`), whose client
  is a `RemoteClient` too: bodies, answers, errors and the retried count are the same whichever sends.
- Transient HTTP failures (connection errors, 5xx, 429) are retried with backoff `retries` times, each retry
  on the next URL; the samples of a request sent again count once in `num_retried`. A 4xx is the request's
  fault and raises at once (`ValueError`), with the server's message; a request that failed for good raises
  `ConnectionError` (`request_error`).
- A request can be named (`request_id`, SGLang's `rid`) and aborted by that name (`abort`, SGLang's
  `/abort_request`): partial rollout stops the requests it no longer waits for and gets their tokens so far.
- `on_token(sample_index, token_id, logprob)` sees every sampled token: as it is sampled in process (on the
  engine's thread), and all at once when the answer arrives over HTTP (which answers whole outputs). Agent
  sessions stream a turn's reply with it.
"""

import asyncio
import base64
import contextlib
import itertools
from typing import Any, Protocol

import numpy as np
import torch

from leagues.engine.output import Output
from leagues.engine.requests import TokenCallback
from leagues.types import FinishReason, SamplingParams


class EngineClient(Protocol):
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Output]:
        """The `params.n` outputs of one prompt; `request_id` names the request for `abort`; `on_token` sees every
        sampled token (see the decisions above for when)."""
        ...

    async def abort(self, request_id: str) -> None:
        """End a request early: its outputs come back with the tokens so far and finish reason abort."""
        ...

    async def weight_version(self) -> int | None:
        """The version of the weights the engines serve now (the newest one, over several); None: unknown."""
        ...


class LocalClient:
    """An `Engine` of this process, or anything with its `generate_async`, `abort` and `weight_version` (the HTTP
    front's handle of an engine in its own process): requests share the engine's batch loop."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Output]:
        return await self.engine.generate_async(prompt_ids, params, request_id, on_token)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def weight_version(self) -> int | None:
        return self.engine.weight_version


class RemoteClient:
    """What the clients over HTTP share (`HTTPClient`, and the fleet's in `leagues.serve.fleet_client`): a prompt's
    `/generate` body, the answer read into `Output`s with its tokens replayed to `on_token`, errors that carry the
    server's message, and the count of samples sent again. A subclass sends the body (`_send`)."""

    num_retried: int
    """Samples whose request was sent again after a failure, since the client was made (the loop reports the
    step's as `rollout/retried`)."""

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Output]:
        data = await self._send(generate_body(prompt_ids, params, request_id), params.n)
        return replay_tokens(outputs_of(data, prompt_ids), on_token)

    async def _send(self, body: dict, num_samples: int) -> Any:
        """The JSON answer to `/generate` with `body` (`num_samples` outputs), or `request_error`'s error."""
        raise NotImplementedError


class HTTPClient(RemoteClient):
    """Engines behind `/generate` (leagues serve, leagues router, SGLang), round-robin over `urls`."""

    def __init__(self, urls: list[str], timeout_s: float = 600.0, retries: int = 3, api_key: str | None = None):
        import httpx

        if not urls:
            raise ValueError("HTTPClient: no engine URLs given")
        self.urls = [u.rstrip("/") for u in urls]
        self._next = itertools.cycle(range(len(self.urls)))
        self.retries = retries
        self.num_retried = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self._httpx = httpx

    async def _send(self, body: dict, num_samples: int) -> Any:
        for attempt in range(self.retries + 1):
            url = self.urls[next(self._next)]
            try:
                response = await self._client.post(url + "/generate", json=body)
            except self._httpx.TransportError as e:
                error: Exception = ConnectionError(f"{url}: {type(e).__name__}: {e}")
            else:
                if response.status_code < 400:
                    return response.json()
                error = request_error(response.status_code, _answer(response), f"{url}: ")
                if not isinstance(error, ConnectionError):
                    raise error
            if attempt < self.retries:
                if attempt == 0:  # a request's samples count once, however often it is sent again
                    self.num_retried += num_samples
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        raise ConnectionError(f"generation failed after {self.retries + 1} attempts: {error}")

    async def abort(self, request_id: str) -> None:
        """`/abort_request` to every URL (the one serving the request aborts it, the others know no such id); best
        effort: an engine that cannot be reached or has no such route lets the request run to its end."""
        for url in self.urls:
            with contextlib.suppress(self._httpx.HTTPError):
                await self._client.post(url + "/abort_request", json={"rid": request_id})

    async def weight_version(self) -> int | None:
        """The newest `weight_version` of `/get_model_info` over the URLs that answer it."""
        versions = []
        for url in self.urls:
            with contextlib.suppress(self._httpx.HTTPError, ValueError, TypeError, KeyError):
                response = await self._client.get(url + "/get_model_info")
                versions.append(int(response.json()["weight_version"]))
        return max(versions, default=None)

    async def aclose(self) -> None:
        await self._client.aclose()


def request_error(status: int, body: Any, where: str = "") -> ValueError | ConnectionError:
    """The error of a `/generate` answered with HTTP `status`: `ConnectionError` for the server's trouble (5xx, and
    429: overloaded), worth sending again; `ValueError` for the request's own fault (other 4xx), never sent again.
    Its message is the server's."""
    kind = ConnectionError if status >= 500 or status == 429 else ValueError
    return kind(f"{where}HTTP {status}: {_error_message(body)}")


def _error_message(body: Any) -> str:
    """The message of an engine's error answer: `{"error": {"message"}}` (leagues serve, OpenAI, a router),
    SGLang's `{"error": "..."}` or `{"message"}`, else the body itself; at most 300 characters."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message") is not None:
            body = error["message"]
        elif error is not None:
            body = error
        elif body.get("message") is not None:
            body = body["message"]
    return str(body)[:300]


def _answer(response) -> Any:
    """A response's JSON, else its text."""
    try:
        return response.json()
    except ValueError:
        return response.text


def generate_body(prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> dict:
    """The SGLang `/generate` body of one prompt (`params.n` samples), with logprobs and, if asked, routes."""
    body = {
        "input_ids": prompt_ids,
        "sampling_params": _sampling_body(params),
        "return_logprob": True,
        "return_routed_experts": params.return_routed_experts,
    } | ({"rid": request_id} if request_id is not None else {})
    if params.routed_experts_start:
        body["routed_experts_start"] = params.routed_experts_start
    return body


def replay_tokens(outputs: list[Output], on_token: TokenCallback | None) -> list[Output]:
    """Hand a whole answer's tokens to `on_token`, as an in-process engine would have while sampling."""
    if on_token is not None:
        for o in outputs:
            for token_id, logprob in zip(o.token_ids, o.logprobs, strict=False):
                on_token(o.index, token_id, logprob)
    return outputs


def outputs_of(data: dict | list, prompt_ids: list[int]) -> list[Output]:
    """The `Output`s of a `/generate` answer (one object, or a list of them for n > 1)."""
    items = data if isinstance(data, list) else [data]
    return [_output(item, prompt_ids, i) for i, item in enumerate(items)]


def _sampling_body(params: SamplingParams) -> dict:
    body = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": params.stop_token_ids,
        "stop": params.stop,
        "ignore_eos": params.ignore_eos,
        "n": params.n,
    }
    return body | ({"seed": params.seed} if params.seed is not None else {})


def _output(item: dict, prompt_ids: list[int], index: int) -> Output:
    meta = item.get("meta_info", {})
    reason = (meta.get("finish_reason") or {}).get("type", "stop")
    routes = None
    if meta.get("routed_experts") is not None:
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype="<i4")
        routes = torch.from_numpy(flat.copy()).view(*meta["routed_experts_shape"]).to(torch.uint8)
    return Output(
        request_id=str(meta.get("id", "")),
        index=index,
        prompt_token_ids=prompt_ids,
        token_ids=list(item["output_ids"]),
        logprobs=[float(entry[0]) for entry in meta.get("output_token_logprobs", [])],
        finish_reason=FinishReason(reason),
        text=item.get("text", ""),
        routed_experts=routes,
        weight_version=int(meta.get("weight_version", 0)),
        first_weight_version=int(meta.get("first_weight_version", 0)),
        num_cached_tokens=int(meta.get("cached_tokens", 0)),
    )
