"""The same broadcast sync against a real `leagues serve` process: a trainer process sends the weights
of a second checkpoint over `/init_weights_update_group` + `/update_weights_from_distributed` (gloo),
and the server's greedy outputs and weight version then match that checkpoint."""

import httpx

from leagues.engine import Engine
from leagues.model import write_tiny_moe
from tests import processes
from tests.serve.test_server import _launch, _wait_url

from .test_distributed import GREEDY, PROMPTS, VERSION, _next, _trainer, free_port


def test_leagues_serve_receives_broadcast_weights(tmp_path):
    second = write_tiny_moe(tmp_path / "second", seed=1)
    server = _launch()
    ctx = processes.context()
    results, proceed = ctx.Queue(), ctx.Event()
    try:
        url = _wait_url(server)
        trainer = ctx.Process(target=_trainer, args=([url], free_port(), str(second), results, proceed))
        trainer.start()
        try:
            assert "has shape (3, 5)" in _next(results) and "matches no parameter" in _next(results)
            proceed.set()
            assert _next(results) > 0
        finally:
            proceed.set()
            trainer.join(timeout=30)
        assert trainer.exitcode == 0
        reference = Engine(second, num_blocks=64)
        try:
            expected = [o.token_ids for o in reference.generate(PROMPTS, GREEDY)]
        finally:
            reference.close()
        for prompt, ids in zip(PROMPTS, expected, strict=True):
            body = {
                "input_ids": prompt,
                "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
            }
            response = httpx.post(f"{url}/generate", json=body, timeout=30).json()
            assert response["output_ids"] == ids
            assert int(response["meta_info"]["weight_version"]) == VERSION
        assert httpx.get(f"{url}/get_server_info", timeout=30).json()["weight_version"] == VERSION
    finally:
        server.terminate()
        server.wait(timeout=10)
