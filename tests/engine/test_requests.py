"""What the engine's loop thread keeps per request: a caller that gives up (a cancelled future: an HTTP client
that timed out) never stops the loop, and a duplicate request id fails only that request."""

import concurrent.futures

import pytest

from leagues.engine import SamplingParams

from .reference import GREEDY


def test_a_cancelled_request_does_not_stop_the_engine(engine):
    short = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)  # it ends while the next one runs
    future = engine.submit([5, 6, 7], short)
    future.cancel()  # before the engine settles it: settling a cancelled future raises InvalidStateError
    engine.abort("req-unknown")  # an id the engine never saw: nothing happens
    out = engine.generate([[8, 9, 10]], GREEDY)
    assert len(out[0].token_ids) == GREEDY.max_new_tokens
    assert engine.is_alive


def test_a_duplicate_request_id_fails_that_request_only(engine):
    long = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    first = engine.submit([5, 6, 7], long, request_id="same")
    second = engine.submit([5, 6, 8], long, request_id="same")
    with pytest.raises(ValueError, match="already in flight"):
        second.result(timeout=30)
    assert len(first.result(timeout=30)[0].token_ids) == 30
    assert isinstance(first, concurrent.futures.Future) and engine.is_alive
