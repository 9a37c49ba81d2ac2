"""The engine's weights and memory: sleep/wake (with and without offloading weights, with requests in
flight) leaves greedy outputs unchanged; `load_weights` by our names and by HF names swaps in another
checkpoint exactly, stamps outputs with the new version, drops the stale prefix cache, and rejects
names and shapes that fit nothing.
"""

import time

import pytest
import safetensors.torch
import torch

from leagues.engine import SamplingParams
from leagues.model import load_pretrained, write_tiny_moe

from .reference import GREEDY, engine_of, generate_ids, make_prompts

PROMPTS = make_prompts([3, 18, 35], 101, seed=30)


@pytest.fixture(scope="module")
def second_path(tmp_path_factory):
    return write_tiny_moe(tmp_path_factory.mktemp("second"), seed=1)


@pytest.fixture(scope="module")
def own_engine(tiny_path):
    """An engine with its own copy of the weights (these tests overwrite them)."""
    with engine_of(tiny_path, num_blocks=64, block_size=8) as engine:
        yield engine


def test_sleep_wake_keeps_outputs(own_engine):
    engine = own_engine
    expected = generate_ids(engine, PROMPTS)
    engine.sleep()
    assert engine.runner.kv_cache is None
    engine.sleep()  # idempotent
    engine.wake()
    engine.wake()
    assert generate_ids(engine, PROMPTS) == expected
    engine.sleep(offload_weights=True)
    engine.wake()
    assert generate_ids(engine, PROMPTS) == expected


def test_sleep_with_requests_in_flight(own_engine):
    engine = own_engine
    params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
    expected = generate_ids(engine, PROMPTS, params)
    generated = engine.stats["generated_tokens"]
    futures = [engine.submit(p, params) for p in PROMPTS]
    deadline = time.monotonic() + 30
    while engine.stats["generated_tokens"] < generated + 3 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the requests run
    num_preemptions = engine.scheduler.num_preemptions
    engine.sleep()  # running requests are paused, their blocks freed
    assert engine.scheduler.num_preemptions > num_preemptions
    assert not any(f.done() for f in futures)
    engine.wake()  # and recomputed
    assert [f.result(timeout=60)[0].token_ids for f in futures] == expected


def test_load_weights_swaps_checkpoints(own_engine, tiny_path, second_path):
    engine = own_engine
    expected_first = generate_ids(engine, PROMPTS)  # also fills the prefix cache with the first weights
    with engine_of(second_path, num_blocks=64, block_size=8) as fresh:
        expected_second = generate_ids(fresh, PROMPTS)
    assert expected_second != expected_first

    ours = list(load_pretrained(second_path).named_parameters())
    engine.load_weights(((name, p.detach()) for name, p in ours), version=5)
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected_second
    assert {(o.weight_version, o.first_weight_version) for o in outputs} == {(5, 5)}

    # HF names, straight from the safetensors files; the version counts up by default
    engine.load_weights(safetensors.torch.load_file(tiny_path / "model.safetensors").items())
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected_first and outputs[0].weight_version == 6
    engine.load_weights(safetensors.torch.load_file(second_path / "model.safetensors").items(), version=7)
    assert generate_ids(engine, PROMPTS) == expected_second

    # a request in flight across an update reports both versions
    future = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    engine.load_weights(safetensors.torch.load_file(tiny_path / "model.safetensors").items(), version=8)
    (out,) = future.result(timeout=60)
    assert (out.first_weight_version, out.weight_version) == (7, 8)


def test_load_weights_rejects_bad_names_and_shapes(own_engine):
    engine = own_engine
    expected = generate_ids(engine, PROMPTS)
    with pytest.raises(ValueError, match="matches no parameter"):
        engine.load_weights([("model.layers.0.no_such.weight", torch.zeros(3))])
    embed = engine.model.embed.weight
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("embed.weight", torch.zeros(embed.shape[0] + 1, embed.shape[1]))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.embed_tokens.weight", torch.zeros(3, 3))])
    assert generate_ids(engine, PROMPTS) == expected  # nothing was written
