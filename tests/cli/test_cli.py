"""The `leagues` command: help for every verb, exit codes, config resolution, and the built verbs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leagues.cli.generate import GenerateConfig
from leagues.cli.main import VERBS, main
from leagues.config import from_dict, load_yaml
from leagues.recipes import RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[2]


def run_main(argv: list[str]) -> int:
    """`main(argv)`'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("verb", list(VERBS))
def test_help_for_every_verb(verb, capsys):
    assert run_main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"leagues {verb}" in out
    if VERBS[verb].config_cls is GenerateConfig:
        assert "--max_new_tokens int = 32" in out
        assert "Sampling temperature; 0 is greedy decoding." in out


def test_every_verb_runs_something():
    """No verb is listed that only says it is not built (`bench` was; the benchmarks live in `benchmarks/`)."""
    assert "bench" not in VERBS and all(callable(verb.run) for verb in VERBS.values())


def test_no_verb_is_a_usage_error():
    assert run_main([]) == 2


@pytest.mark.parametrize("module", ["leagues.cli.main", "leagues.cli"])
def test_module_entry_points(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "convert" in proc.stdout


def test_unknown_override_exits_2_naming_the_key(capsys):
    assert run_main(["generate", "--temperatur", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "leagues: error: unknown config key 'temperatur' (did you mean 'temperature'?)"


def test_bad_value_and_bad_recipe_exit_2(capsys):
    assert run_main(["generate", "--max-new-tokens", "many"]) == 2
    assert "max_new_tokens: expected int, got 'many'" in capsys.readouterr().err
    assert run_main(["generate", "--temperature", "-1"]) == 2
    assert "temperature: must be >= 0" in capsys.readouterr().err
    assert run_main(["generate", "--recipe", "nope"]) == 2
    assert (
        "unknown recipe 'nope' (known: tiny-arithmetic, tiny-arithmetic-ppo, tiny-generate, tiny-lookup)"
        in capsys.readouterr().err
    )
    assert run_main(["convert", "--recipe", "tiny-generate"]) == 2
    assert "recipe 'tiny-generate' for `leagues convert`: unknown config key 'prompt'" in capsys.readouterr().err


def test_print_and_dump_config_round_trip(tmp_path, capsys):
    dumped = tmp_path / "run.yaml"
    argv = ["generate", "--recipe", "tiny-generate", "--prompt=hi there", "--chat", "--dump-config", str(dumped)]
    assert run_main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["prompt"] == "hi there" and printed["chat"] is True
    assert load_yaml(GenerateConfig, dumped) == GenerateConfig(**printed)
    assert run_main(["generate", "--config", str(dumped), "--seed", "7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {**printed, "seed": 7}


def test_print_config_of_a_train_run_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["train", "--steps", "3", "--trainer.num_minibatches", "2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["trainer"]["optim"]["total_steps"] == 6  # resolved: what would run
    assert list(tmp_path.iterdir()) == []
    assert run_main(["train", "--engine.deterministic", "true", "--print-config"]) == 2  # refused by resolve
    assert "engine.deterministic" in capsys.readouterr().err


def test_config_file_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("model: tiny-moe\nmax_new_tokens: 4\ntemprature: 0.5\n")
    assert run_main(["generate", "--config", str(bad)]) == 2
    assert f"{bad}:3: unknown config key 'temprature'" in capsys.readouterr().err


def test_recipes_registry():
    assert set(RECIPES) >= {"tiny-generate"}
    assert from_dict(GenerateConfig, get_recipe("tiny-generate")).model == "tiny-moe"
    with pytest.raises(ValueError, match="known: tiny-arithmetic, tiny-arithmetic-ppo, tiny-generate"):
        get_recipe("nope")
    from leagues.loop import TrainConfig

    lookup = from_dict(TrainConfig, get_recipe("tiny-lookup"))
    assert lookup.task == "lookup" and lookup.agent.max_turns == 2 and lookup.warm_start.steps == 500
    ppo, grpo = (
        from_dict(TrainConfig, get_recipe("tiny-arithmetic-ppo")),
        from_dict(TrainConfig, get_recipe("tiny-arithmetic")),
    )
    assert ppo.advantage.needs_critic and ppo.critic.warmup_steps == 10
    assert (ppo.trainer, ppo.warm_start, ppo.steps) == (grpo.trainer, grpo.warm_start, grpo.steps)  # only PPO differs


# ---------------------------------------------------------------------------------------------------
# verbs that load the model (skipped while leagues.model is unavailable)


@pytest.fixture
def tiny_dir():
    """The built-in tiny MoE, made once per session under the LEAGUES_HOME that conftest.py sets."""
    model = pytest.importorskip("leagues.model")
    return model.resolve_model_path("tiny-moe")


def test_generate_greedy_is_deterministic(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "5"]
    assert run_main(argv) == 0
    first = capsys.readouterr()
    assert "5 new tokens" in first.err
    assert run_main(argv) == 0
    assert capsys.readouterr().out == first.out


def test_generate_sampled_with_chat(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--chat", "--temperature", "1.0", "--seed", "3", "--max-new-tokens"]
    assert run_main([*argv, "4"]) == 0
    assert "prompt tokens" in capsys.readouterr().err


def test_generate_missing_model_exits_2(tiny_dir, tmp_path, capsys):
    assert run_main(["generate", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leagues: error: ") and "nope" in err and "Traceback" not in err


def test_run_main_job_is_the_grpo_recipe_shortened(tmp_path, capsys):
    """`leagues run` (make run) is `leagues train --recipe tiny-arithmetic`; here cut to a few seconds."""
    short = ["--warm_start.steps", "5", "--steps", "2", "--eval.num_prompts", "16", "--eval.every", "2"]
    args = [*short, "--rollout.batch_size", "4", "--obs.tensorboard", "false", "--run_dir", str(tmp_path / "run")]
    assert run_main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "report:" in out
    assert (tmp_path / "run" / "report" / "summary.md").is_file()


def test_convert_round_trip(tiny_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert run_main(["convert", "--model", str(tiny_dir), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    generate = ["generate", "--prompt", "abc", "--max-new-tokens", "6", "--model"]
    assert run_main([*generate, str(tiny_dir)]) == 0
    expected = capsys.readouterr().out
    assert run_main([*generate, str(out)]) == 0
    assert capsys.readouterr().out == expected
    assert run_main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert run_main(["convert", "--model", str(tiny_dir)]) == 2


def test_generate_jsonl_in_and_out(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "abc"}, {"prompt": [5, 6, 7]}, {"prompt": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(tiny_dir), "--input", str(prompts), "--output", str(out), "--n", "2"]
    assert run_main([*argv, "--temperature", "1", "--max-new-tokens", "4", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and [r["index"] for r in records] == [0, 1] * 3
    assert all(len(r["token_ids"]) == len(r["logprobs"]) <= 4 for r in records)
    assert "6 outputs" in capsys.readouterr().err


def test_generate_jsonl_bad_line_names_file_line_field(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert run_main(["generate", "--model", str(tiny_dir), "--input", str(prompts)]) == 2
    assert f"{prompts}:2: missing field 'prompt'" in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n{not json\n')
    assert run_main(["generate", "--model", str(tiny_dir), "--input", str(prompts)]) == 2
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_with_two_ranks_via_nproc(tiny_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(8)))
    argv = ["sft", "--model", str(tiny_dir), "--data", str(data), "--nproc", "2", "--batch-size", "4"]
    proc = subprocess.run([sys.executable, "-m", "leagues.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("sft: 2 steps") == 1  # rank 0 reports, once


def test_a_failing_rank_stops_the_job_instead_of_hanging_it(tmp_path):
    # Rank 1 fails while rank 0 waits in a collective that rank 1 will never join: the failing rank must
    # leave at once (no closing barrier), so the launcher stops rank 0 and the job ends with the error.
    script = tmp_path / "job.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from leagues.cli.launch import distributed_session\n"
        "with distributed_session():\n"
        "    if dist.get_rank() == 1:\n"
        "        raise RuntimeError('rank 1 failed here')\n"
        "    dist.all_reduce(torch.ones(1))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 failed here" in proc.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_loopback(tiny_dir, tmp_path):
    """Two launchers, one rank each, meet at node 0's rendezvous endpoint: one job of two ranks (gloo)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(8)))
    endpoint = f"127.0.0.1:{free_port()}"
    argv = ["sft", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "4", "--nnodes", "2"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "leagues.cli", *argv, "--node-rank", str(rank), "--rdzv_endpoint", endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, err[-2000:]
    # 8 pairs in batches of 4 over a world of 2: rank 0 of the job (node 0) reports 2 steps, node 1 nothing
    assert outs[0][1].count("sft: 2 steps") == 1 and "sft:" not in outs[1][1]
    assert "epoch 0 step 2" in outs[0][0] and "epoch 0 step" not in outs[1][0]


@pytest.mark.parametrize(
    "args, error",
    [
        (["--nnodes", "2"], "rdzv_endpoint: nnodes 2 needs HOST:PORT"),
        (["--nnodes", "2", "--node_rank", "2", "--rdzv_endpoint", "h:1"], "node_rank: must be in 0..1"),
        (["--nnodes", "0"], "must be >= 1"),
    ],
)
def test_bad_multi_node_options_are_named(args, error, capsys):
    assert run_main(["train", "--task", "arithmetic", *args]) == 2
    assert error in capsys.readouterr().err
