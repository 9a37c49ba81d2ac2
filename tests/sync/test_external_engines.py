"""Weights to real `leagues serve` processes on loopback, as the RL loop sends them: behind keys, and over a
weight-update group (gloo) that loses an engine in the middle of a send and takes it back once it restarts.

Keys: an engine with an API key and an admin key takes weights (from disk and over a group) with its admin
key, and refuses them with an error that says what is wrong with the key: none sent or a wrong one (401), or
the plain key where the admin key is needed (403). A run (`leagues train --engine_urls`) with the admin key as
its `fleet.api_key` updates the engine; with another key it stops at its first weight update, saying why.

Faults: two engines take a checkpoint's weights bucket by bucket; after the first bucket one of them is killed
(SIGKILL). The send goes on to the other (the bucket again, then the rest, in a new group of it alone), which
ends up serving exactly that checkpoint; the dead engine is the one failure. The live engine may wait out its
weight-group timeout (5 s here) for broadcasts the death cut short. The next send goes to the live engine
only; the restarted engine, marked rejoining as the fleet marks it, is caught up in a new group of both.
"""

import httpx
import pytest
import torch

from leagues.cli.main import main
from leagues.config import apply_overrides
from leagues.engine import Engine, SamplingParams
from leagues.loop import TrainConfig, train
from leagues.model import load_pretrained, resolve_model_path, write_tiny_moe
from leagues.serve.fleet import FleetError
from leagues.sync import DistributedWeightSender, EngineRefused, update_from_disk
from leagues.types import WeightTarget
from tests.serve.engines import API_KEY, AUTH, EngineServer, free_port

ADMIN_KEY = "admin-test-key"
ENGINE_ARGS = ["--engine.num_blocks", "128", "--engine.max_model_len", "64"]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPT = [5, 17, 33, 8, 64]


def buckets(checkpoint, per_bucket: int = 8) -> list[list[tuple[str, torch.Tensor]]]:
    named = [(name, p.detach()) for name, p in load_pretrained(checkpoint).named_parameters()]
    return [named[i : i + per_bucket] for i in range(0, len(named), per_bucket)]


def greedy(url: str, headers: dict) -> tuple[list[int], int]:
    body = {"input_ids": PROMPT, "sampling_params": GREEDY}
    answer = httpx.post(url + "/generate", json=body, headers=headers, timeout=30).json()
    return answer["output_ids"], int(answer["meta_info"]["weight_version"])


def reference(checkpoint) -> list[int]:
    engine = Engine(checkpoint, num_blocks=64)
    try:
        return engine.generate([PROMPT], SamplingParams(**GREEDY))[0].token_ids
    finally:
        engine.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return write_tiny_moe(root / "seed1", seed=1), write_tiny_moe(root / "seed2", seed=2)


def run_args(run_dir, url: str, key: str | None = None) -> list[str]:
    args = ["--task", "arithmetic", "--task_params", "{max_digits: 1}", "--steps", "1", "--rollout.batch_size", "2",
            "--rollout.n_samples_per_prompt", "2", "--rollout.max_response_len", "4", "--engine_urls", f"[{url}]",
            "--checkpoint.enabled", "false", "--report", "false", "--obs.tensorboard", "false",
            "--obs.console", "false", "--run_dir", str(run_dir)]  # fmt: skip
    return args + (["--fleet.api_key", key] if key is not None else [])


def run_config(run_dir, url: str, key: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), run_args(run_dir, url, key))


def test_weight_updates_carry_the_key_and_say_what_is_wrong_with_it(tmp_path, checkpoints, monkeypatch):
    first, second = checkpoints
    engine = EngineServer(resolve_model_path("tiny-moe"), free_port(), tmp_path, args=ENGINE_ARGS, admin_key=ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        engine.start().wait_ready()
        for key, said in [(None, "no key was sent"), ("nope", "the key sent is wrong")]:
            with pytest.raises(EngineRefused, match="HTTP 401: the engine wants its API key") as err:
                update_from_disk([engine.url], first, 1, api_key=key)
            assert said in str(err.value) and "fleet.api_key" in str(err.value)
        with pytest.raises(EngineRefused, match="HTTP 403: this route needs the engine's admin key"):
            update_from_disk([engine.url], first, 1, api_key=API_KEY)  # opens generation, not weights
        assert greedy(engine.url, AUTH)[1] == 0  # nothing changed
        update_from_disk([engine.url], first, 1, api_key=ADMIN_KEY)
        assert greedy(engine.url, AUTH) == (reference(first), 1)

        plain = DistributedWeightSender([engine.url], "127.0.0.1", free_port(), "gloo", api_key=API_KEY, timeout_s=2)
        with plain, pytest.raises(EngineRefused, match="HTTP 403: this route needs the engine's admin key"):
            plain.init()  # refused before any rendezvous begins (nothing left waiting at close)
        with DistributedWeightSender([engine.url], "127.0.0.1", free_port(), "gloo", api_key=ADMIN_KEY) as sender:
            sender.init()
            sender.send(buckets(second), weight_version=2)
        assert greedy(engine.url, admin) == (reference(second), 2)

        with pytest.raises(FleetError, match="HTTP 403: this route needs the engine's admin key"):
            train(run_config(tmp_path / "plain", engine.url, API_KEY))
        with pytest.raises(FleetError, match="HTTP 401: missing or wrong API key"):
            train(run_config(tmp_path / "wrong", engine.url, "nope"))  # its health check says it first
        assert len(train(run_config(tmp_path / "admin", engine.url, ADMIN_KEY))) == 1
        assert greedy(engine.url, AUTH)[1] == 1  # the run's weights, after its one step
        # from the environment through the CLI, as a user keeps it out of the process list; never in config.yaml
        monkeypatch.setenv("LEAGUES_API_KEY", ADMIN_KEY)
        assert main(["train", *run_args(tmp_path / "env", engine.url)]) == 0
        assert greedy(engine.url, AUTH)[1] == 1  # a new run's first step: version 1 again, its own weights
        for run in ("admin", "env"):
            assert ADMIN_KEY not in (tmp_path / run / "config.yaml").read_text()
    finally:
        engine.stop()


@pytest.mark.slow
def test_a_group_loses_a_dead_engine_mid_send_and_takes_it_back_after_a_restart(tmp_path, checkpoints):
    first, second = checkpoints
    tiny = resolve_model_path("tiny-moe")
    args = [*ENGINE_ARGS, "--limits.weight_group_timeout", "5"]
    live, victim = (EngineServer(tiny, free_port(), tmp_path, args=args) for _ in range(2))

    def killing_after_the_first(all_buckets):
        for i, bucket in enumerate(all_buckets):
            if i == 1:
                victim.kill()  # after the first bucket went to both: the next one finds it dead
            yield bucket

    sender = DistributedWeightSender([live.url, victim.url], "127.0.0.1", free_port(), "gloo", timeout_s=60)
    try:
        for engine in (live, victim):
            engine.start()
        for engine in (live, victim):
            engine.wait_ready()
        targets = [WeightTarget(live.url, AUTH), WeightTarget(victim.url, AUTH)]
        failures = sender.send_to(targets, killing_after_the_first(buckets(first)), weight_version=1)
        assert list(failures) == [victim.url], failures
        assert greedy(live.url, AUTH) == (reference(first), 1)  # every bucket arrived: exactly that checkpoint

        assert sender.send_to(targets[:1], buckets(second), weight_version=2) == {}  # the live engine only
        assert greedy(live.url, AUTH) == (reference(second), 2)

        victim.start()  # back at its base weights (version 0); the fleet marks it rejoining
        victim.wait_ready()
        rejoining = [targets[0], WeightTarget(victim.url, AUTH, rejoining=True)]
        assert sender.send_to(rejoining, buckets(second), weight_version=3) == {}
        assert greedy(live.url, AUTH) == greedy(victim.url, AUTH) == (reference(second), 3)
    finally:
        sender.close()
        for engine in (live, victim):
            engine.stop()
