"""The HTTP engine client's sending, against a scripted transport (no server): what is sent again and how often
it counts, which failures are the request's own, and that errors carry the server's message. The fleet's client
shares the rest (`RemoteClient`), and is tested against real engines in tests/serve/test_fleet.py."""

import asyncio

import httpx
import pytest

from leagues.engine.client import HTTPClient, request_error
from leagues.types import SamplingParams

PARAMS = SamplingParams(temperature=0, max_new_tokens=2, n=2)
ANSWER = [
    {"output_ids": [7, 8], "meta_info": {"output_token_logprobs": [[-0.5, 7], [-0.25, 8]], "weight_version": 3}}
] * 2


def scripted(*replies: tuple[int, object]) -> tuple[HTTPClient, list[str]]:
    """A client over two URLs whose requests get `replies` in turn; the URLs it posted to."""
    posted, queue = [], list(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        posted.append(str(request.url))
        status, body = queue.pop(0)
        return httpx.Response(status, json=body) if not isinstance(body, str) else httpx.Response(status, text=body)

    client = HTTPClient(["http://a", "http://b"], retries=3)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return client, posted


def test_a_request_sent_again_counts_its_samples_once_and_moves_on_to_the_next_url():
    client, posted = scripted((503, {"error": {"message": "overloaded"}}), (429, "slow down"), (200, ANSWER))
    outputs = asyncio.run(client.generate([1, 2, 3], PARAMS))
    assert [o.token_ids for o in outputs] == [[7, 8], [7, 8]] and outputs[0].weight_version == 3
    assert outputs[0].logprobs == [-0.5, -0.25]
    assert posted == ["http://a/generate", "http://b/generate", "http://a/generate"]
    assert client.num_retried == PARAMS.n  # two more attempts, one request: its samples count once


def test_the_requests_own_fault_is_not_sent_again_and_says_the_servers_message():
    client, posted = scripted((400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}}))
    with pytest.raises(ValueError, match="http://a: HTTP 400: prompt too long"):
        asyncio.run(client.generate([1], PARAMS))
    assert len(posted) == 1 and client.num_retried == 0
    client, _ = scripted(*[(500, {"message": "engine loop died"})] * 4)
    with pytest.raises(ConnectionError, match="failed after 4 attempts: .*HTTP 500: engine loop died"):
        asyncio.run(client.generate([1], PARAMS))


def test_request_errors_read_every_error_shape():
    assert isinstance(request_error(503, {"error": {"message": "m"}}), ConnectionError)
    assert isinstance(request_error(429, "busy"), ConnectionError)
    assert str(request_error(404, {"error": "no such route"}, "x: ")) == "x: HTTP 404: no such route"
    assert isinstance(request_error(422, {"detail": []}), ValueError)
