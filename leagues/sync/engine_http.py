"""The requests weight transports make to external engines, and what their failures say.

    answer = post(url, "/update_weights_from_disk", body, headers={"Authorization": "Bearer <key>"})

Where it sits: under both transports to HTTP engines (`disk.py`, `distributed.py`), which post JSON to SGLang's
weight routes of `leagues serve` or SGLang servers and read the JSON answer. The headers are the engine's own
(`WeightTarget.headers`: the run's key, when the engine is behind one).

Decisions:
- An engine that cannot be reached raises `EngineUnreachable` (a `ConnectionError`); an HTTP error status raises
  `EngineRefused` with the engine's message. Both name the engine and the route.
- A refused key says so, since it is a configuration error the run cannot get past: 401 (the engine wants its
  key: none was sent, or another one) and 403 (the route needs the engine's admin key, and the key sent opens
  only generation). A run sends its `fleet.api_key` for generation and weights alike, so an engine with an
  admin key needs that key there (the admin key also opens generation).
- `died` tells a dead engine (connection refused, reset or closed) from one that is slow or refuses: a
  weight-update group can go on without the first (its broadcasts to it fail at once), not without the others.
"""

from typing import Any

import httpx

KEY_SOURCE = "a run sends its fleet.api_key"
DEFAULT_TIMEOUT_S = 600.0
"""Seconds a request may take (a weight load reads a whole checkpoint)."""


class EngineRefused(RuntimeError):
    """An engine answered a weight-update request with an error (`status`: its HTTP status, if it was one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EngineUnreachable(ConnectionError):
    """An engine could not be reached (or its connection broke) during a weight-update request."""

    def __init__(self, message: str, died: bool) -> None:
        super().__init__(message)
        self.died = died
        """The engine is gone (refused or dropped the connection), not merely slow."""


def post(
    url: str,
    route: str,
    body: dict,
    *,
    headers: dict[str, str] | None = None,
    client: httpx.Client | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The engine's JSON answer to `POST url+route`, through `client` if given; `EngineUnreachable` or
    `EngineRefused` (see above). `timeout_s`: None is the client's timeout, else `DEFAULT_TIMEOUT_S`."""
    where = url.rstrip("/") + route
    try:
        if client is not None:
            timeout = {"timeout": timeout_s} if timeout_s is not None else {}
            response = client.post(where, json=body, headers=headers, **timeout)
        else:
            response = httpx.post(where, json=body, headers=headers, timeout=timeout_s or DEFAULT_TIMEOUT_S)
    except httpx.TransportError as err:
        died = not isinstance(err, httpx.TimeoutException)
        raise EngineUnreachable(f"{where}: {type(err).__name__}: {err}".rstrip(": "), died) from None
    answer = _json(response)
    if response.status_code >= 400:
        message = f"{where}: HTTP {response.status_code}: {_refusal(response, answer, headers)}"
        raise EngineRefused(message, response.status_code)
    return answer if isinstance(answer, dict) else {}


def died(err: BaseException | None) -> bool:
    """`err` says the engine is gone (see `EngineUnreachable.died`)."""
    return isinstance(err, EngineUnreachable) and err.died


def key_refused(err: BaseException | None) -> bool:
    """`err` is an engine refusing the key sent (401, 403)."""
    return isinstance(err, EngineRefused) and err.status in (401, 403)


def _refusal(response: httpx.Response, answer: Any, headers: dict[str, str] | None) -> str:
    said = _said(response, answer)
    if response.status_code == 401:
        sent = "the key sent is wrong" if headers and "Authorization" in headers else "no key was sent"
        return f"the engine wants its API key and {sent} ({KEY_SOURCE}); the engine says: {said}"
    if response.status_code == 403:
        return (
            f"this route needs the engine's admin key and the key sent is not it ({KEY_SOURCE}: give it the "
            f"engines' admin key, which opens generation too); the engine says: {said}"
        )
    return said


def _said(response: httpx.Response, answer: Any) -> str:
    """The engine's message: `{"message"}` (SGLang's weight routes), `{"error": {"message"}}`, else the text."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and error.get("message") is not None:
            return str(error["message"])[:500]
        if answer.get("message") is not None:
            return str(answer["message"])[:500]
    return response.text[:500]


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
