"""Weight sync by broadcast to HTTP engines, in real processes on the CPU (gloo over loopback).

The engine side is two in-process engines on the tiny MoE, each behind a small FastAPI app made here
(the real server's routes call the same two functions of `leagues.engine.remote_weights`). The trainer
is another process: it loads a second tiny checkpoint (seed 1) in a `Trainer` and sends it with
`DistributedWeightSender` in several buckets at weight version 3 (ranks 1 and 2 of a group of 3). Then
both engines' greedy outputs equal those of a fresh engine on the second checkpoint, and they report
version 3. Before that, the trainer sends a tensor of the wrong shape and one of an unknown name: both
fail with each engine's message, weights and version stay as they were, and the group stays in step for
the real send. Malformed requests are a 400 naming the field, before any broadcast; a sender whose
engine is missing fails at once instead of waiting for the rendezvous.
"""

import os
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from leagues.engine import Engine, SamplingParams
from leagues.engine.remote_weights import (
    WeightReceiver,
    init_weights_update_group,
    update_weights_from_distributed,
)
from leagues.model import load_pretrained, resolve_model_path, write_tiny_moe
from leagues.sync import DistributedWeightSender
from leagues.sync.distributed import EngineRefused
from tests import processes

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 33, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48], [99]]
GROUP = "test-weights"
VERSION = 3
NUM_ENGINES = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the engine's HTTP side


def make_app(engine: Engine, receiver: WeightReceiver) -> FastAPI:
    """The two protocol routes (sync handlers: they block, so they run in the threadpool) and a generate."""
    app = FastAPI()

    def answer(fn, req: dict):
        try:
            return fn(engine, receiver, req)
        except ValueError as err:
            return JSONResponse({"success": False, "message": str(err)}, status_code=400)

    @app.post("/init_weights_update_group")
    def init_group(req: dict = Body(...)):  # noqa: B008
        return answer(init_weights_update_group, req)

    @app.post("/update_weights_from_distributed")
    def update(req: dict = Body(...)):  # noqa: B008
        return answer(update_weights_from_distributed, req)

    @app.post("/generate")
    def generate(req: dict = Body(...)):  # noqa: B008
        out = engine.generate([req["input_ids"]], GREEDY)[0]
        return {"output_ids": out.token_ids, "meta_info": {"weight_version": str(out.weight_version)}}

    return app


def serve(engine: Engine):
    """Serve `engine` behind the app on a uvicorn thread; returns (url, stop)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, WeightReceiver(timeout_s=60)), port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served():
    """[(url, engine)] of two engines on the tiny MoE, each behind its own app (ranks 1 and 2)."""
    engines = [Engine(resolve_model_path("tiny-moe"), num_blocks=64, block_size=8) for _ in range(NUM_ENGINES)]
    servers = [serve(engine) for engine in engines]
    yield [(url, engine) for (url, _), engine in zip(servers, engines, strict=True)]
    for (_, stop), engine in zip(servers, engines, strict=True):
        stop()
        engine.close()


# ---------------------------------------------------------------- the trainer process


def _trainer(urls: list[str], store_port: int, checkpoint: str, results, proceed) -> None:
    """Bad sends first (reported, then wait for the test to look), then the checkpoint at VERSION."""
    from leagues.train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(checkpoint)
    try:
        with DistributedWeightSender(urls, "127.0.0.1", store_port, backend="gloo", group_name=GROUP) as sender:
            sender.init()
            for bucket in ([("embed.weight", torch.zeros(3, 5))], [("no.such.weight", torch.zeros(4))]):
                try:
                    sender.send([bucket], weight_version=99)
                    results.put(("bad send accepted", bucket[0][0]))
                except EngineRefused as err:
                    results.put(("refused", str(err)))
            proceed.wait(timeout=60)
            count = sender.send(trainer.state_dict_for_sync(bucket_bytes=64 * 1024), weight_version=VERSION)
            results.put(("sent", count))
    except Exception as err:
        results.put(("error", repr(err)))
    results.close()
    results.join_thread()  # flush the queue: os._exit would drop what its feeder thread still holds
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there


def _next(results, timeout: float = 60) -> str | int:
    kind, value = results.get(timeout=timeout)
    assert kind not in ("error", "bad send accepted"), value
    return value


def greedy_ids(engine: Engine) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]


# ---------------------------------------------------------------- tests


def test_malformed_requests_are_400_naming_the_field(served):
    url, engine = served[0]
    good = {"names": ["embed.weight"], "dtypes": ["float32"], "shapes": [[1, 1]], "group_name": GROUP}
    cases = {
        "shapes": {k: v for k, v in good.items() if k != "shapes"},
        "dtypes": good | {"dtypes": ["float99"]},
        "group_name": good | {"group_name": "no-such-group"},
        "colour": good | {"colour": "red"},
        "length": good | {"names": ["a", "b"]},
        "weight_version": good | {"weight_version": "v3"},
    }
    for field, body in cases.items():
        response = httpx.post(f"{url}/update_weights_from_distributed", json=body, timeout=10)
        assert response.status_code == 400, (field, response.text)
        assert field in response.json()["message"], (field, response.text)
    body = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0, "world_size": 2, "backend": "gloo"}
    response = httpx.post(f"{url}/init_weights_update_group", json=body, timeout=10)
    assert response.status_code == 400 and "rank_offset" in response.json()["message"]
    assert engine.weight_version == 0


def test_sender_fails_fast_when_an_engine_is_missing():
    sender = DistributedWeightSender(
        [f"http://127.0.0.1:{free_port()}"], "127.0.0.1", free_port(), backend="gloo", timeout_s=2
    )
    start = time.monotonic()
    with sender:
        with pytest.raises(EngineRefused, match="not formed: .*ConnectError"):
            sender.init()  # no rendezvous begins for an engine that cannot be reached
        assert time.monotonic() - start < 1.5
        with pytest.raises(RuntimeError, match="not ready"):
            sender.send([[("embed.weight", torch.zeros(1))]], weight_version=1)
    # no rendezvous was left waiting, so this process can exit cleanly


def test_broadcast_sync_matches_the_checkpoint(served, tmp_path):
    second = write_tiny_moe(tmp_path / "second", seed=1)
    before = {name: p.detach().clone() for name, p in served[0][1].model.named_parameters()}
    old_outputs = greedy_ids(served[0][1])
    ctx = processes.context()
    results, proceed = ctx.Queue(), ctx.Event()
    urls = [url for url, _ in served]
    trainer = ctx.Process(target=_trainer, args=(urls, free_port(), str(second), results, proceed))
    trainer.start()
    try:
        wrong_shape, unknown = _next(results), _next(results)
        assert wrong_shape.count("'embed.weight' has shape (3, 5)") == NUM_ENGINES, wrong_shape
        assert "weights unchanged" in wrong_shape
        assert unknown.count("'no.such.weight' matches no parameter") == NUM_ENGINES, unknown
        for _, engine in served:
            assert engine.weight_version == 0
            for name, param in engine.model.named_parameters():
                assert torch.equal(param, before[name]), name
        proceed.set()
        assert _next(results) == len(before)
    finally:
        proceed.set()
        trainer.join(timeout=30)
    assert trainer.exitcode == 0
    reference = Engine(second, num_blocks=64, block_size=8)
    try:
        expected = greedy_ids(reference)
    finally:
        reference.close()
    assert expected != old_outputs  # the two checkpoints differ where it shows
    for url, engine in served:
        for prompt, ids in zip(PROMPTS, expected, strict=True):
            response = httpx.post(f"{url}/generate", json={"input_ids": prompt}, timeout=30).json()
            assert response["output_ids"] == ids
            assert response["meta_info"]["weight_version"] == str(VERSION)
        assert engine.weight_version == VERSION
        for name, param in load_pretrained(second).named_parameters():  # and the weights are exact
            assert torch.equal(dict(engine.model.named_parameters())[name], param), name
