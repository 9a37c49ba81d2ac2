"""`leagues train --env module:Factory`: a user's env drives every sample through the built-in multi-turn
generate function, its reward is the run's (no --reward needed), and a bad spec is refused before any work."""

import json

from leagues.cli.main import main


def test_train_with_a_users_env_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(4)))
    args = ["train", "--data", str(data), "--env", "tests.agent.envs_for_tests:Counter", "--steps", "1"]
    args += ["--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.max_response_len", "8"]
    stops = "[" + ",".join("abcdefghijklmnopqrstuvwxyz") + "]"  # the random model's turns end early
    args += [
        "--rollout.stop",
        stops,
        "--agent.max_turns",
        "2",
        "--obs.tensorboard",
        "false",
        "--report",
        "false",
        "--checkpoint.enabled",
        "false",
    ]
    assert main([*args, "--run_dir", str(tmp_path / "run")]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1:]]
    assert row["rollout/failed"] == 0 and row["rollout/num_samples"] == 4
    assert row["rollout/reward_mean"] > 0  # the env's reward: characters of the first turn
    assert row["rollout/response_len_mean"] > 8  # two turns and the bridge between them
    assert row["rollout/agent/turns_mean"] == row["rollout/agent/turns_max"] == 2  # the run's metrics say so
    reasons = {k: v for k, v in row.items() if k.startswith("rollout/agent/termination/")}
    assert reasons == {"rollout/agent/termination/max_turns": 1.0}
    assert main([*args, "--env", "tests.agent.envs_for_tests:Nope", "--run_dir", str(tmp_path / "bad")]) == 2
    assert "env 'tests.agent.envs_for_tests:Nope': cannot load it" in capsys.readouterr().err
    bad = [*args, "--rollout.generate_fn", "x:y", "--run_dir", str(tmp_path / "bad2")]
    assert (
        main(bad) == 2 and "one way of generating per run, got env and rollout.generate_fn" in capsys.readouterr().err
    )


def test_a_deterministic_multi_turn_run_has_zero_mismatch(tmp_path):
    """Every token of every turn: the trainer's logprobs equal the engine's bit for bit, with routing replay."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(4)))
    stops = "[" + ",".join("abcdefghijklmnopqrstuvwxyz") + "]"
    args = ["train", "--data", str(data), "--env", "tests.agent.envs_for_tests:Counter", "--steps", "1"]
    args += ["--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.max_response_len", "8"]
    args += ["--rollout.stop", stops, "--agent.max_turns", "2", "--deterministic", "true"]
    args += ["--trainer.moe.routing_replay", "rollout", "--obs.tensorboard", "false", "--report", "false"]
    assert main([*args, "--checkpoint.enabled", "false", "--run_dir", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/mismatch/abs_diff_max" in r]
    assert len(rows) == 1 and all(r["train/mismatch/abs_diff_max"] == 0.0 for r in rows)
    assert all(r["rollout/response_len_mean"] > 16 for r in rows)  # several turns and their bridges
