"""Disaggregated placement with several trainer ranks, end to end through `leagues train --nproc N`: two trainer
ranks (FSDP2 over the two alone) and two engine ranks finish, learn, evaluate, resume; each trainer rank learns
from whole groups with the advantages of their true groups; and two trainer ranks train the weights one trainer
rank trains, on the same samples.

One trainer rank against two: with `--deterministic` and `--max_staleness 0` the engines' samples depend only on
the weights, so both jobs see the same batches as long as their weights agree; they then differ only in the
order of float sums (FSDP's reduction over two ranks, the packing), so metrics and weights agree to float
tolerance, not bit for bit. The runs start from the base model: a warm start on two ranks would add its own
rounding, which Adam's first steps amplify (an update is about lr x the sign of each gradient entry).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from leagues.config import apply_overrides
from leagues.loop import TrainConfig
from leagues.loop.disaggregated import num_trainer_ranks, split_groups
from leagues.model import load_pretrained, resolve_model_path
from leagues.train.advantages import AdvantageConfig, AdvantageInputs, compute_advantages
from leagues.types import Sample
from tests.loop.test_loop import EASY, REWARDS, assert_improves, comparable, leagues_cli, read_metrics, rl_rows

RECORD = Path(__file__).parent / "record_shares.py"
DISAGGREGATED = ["--placement", "disaggregated", "--num_engine_ranks", "2"]


def shares(record: Path) -> dict[int, list[list]]:
    """Each step's shares as the trainer ranks recorded them: {step: [rank 0's samples, rank 1's samples]}."""
    steps: dict[int, list[list]] = {}
    for rank in (0, 1):
        for line in (record / f"rank-{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], [[], []])[rank] = row["samples"]
    return steps


def assert_whole_true_groups(step_shares: list[list]) -> None:
    """Every group on one trainer rank, with one prompt; 16 groups (the engines' ids never merge); advantages equal
    GRPO's over each group alone."""
    assert all(step_shares), "a trainer rank got nothing to learn from"
    owners = {}
    for rank, samples in enumerate(step_shares):
        for group_id, *_ in samples:
            assert owners.setdefault(group_id, rank) == rank, f"group {group_id} split over trainer ranks"
    everything = [s for samples in step_shares for s in samples]
    groups = {}
    for group_id, _, _, prompt in everything:
        groups.setdefault(group_id, []).append(prompt)
    assert len(groups) == 16 and all(len(g) <= 8 and all(p == g[0] for p in g) for g in groups.values())
    rewards = torch.tensor([s[1] for s in everything])
    ids = torch.tensor([s[0] for s in everything]).unique(return_inverse=True)[1]
    want, _ = compute_advantages(AdvantageInputs(rewards_N=rewards, group_ids_N=ids), AdvantageConfig(estimator="grpo"))
    torch.testing.assert_close(torch.tensor([s[2] for s in everything]), want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_trainer_ranks_two_engines_learn_evaluate_and_resume(tmp_path):
    """2 trainer + 2 engine ranks: six steps that learn, with held-out accuracy at steps 0, 3 and 6 (measured by the
    first engine rank with those steps' weights) and checkpoints of the trainer group, the rollout's routes
    replayed on trainer ranks other than the engines that recorded them; then the run resumes from step 3 (its
    last checkpoint but one) and trains to 6 again."""
    run = tmp_path / "run"
    args = [*EASY, *DISAGGREGATED, "--reward.name", f"{RECORD}:starts_with_one", "--run_dir", str(run)]
    args += ["--trainer.loss.off_policy", "token_tis", "--eval.every", "3", "--eval.num_prompts", "16"]
    args += ["--trainer.moe.routing_replay", "rollout"]
    args += ["--checkpoint.every", "3", "--checkpoint.keep_last", "0"]
    (tmp_path / "record").mkdir()
    leagues_cli("train", "--nproc", "4", *args, env=os.environ | {"LEAGUES_TEST_RECORD": str(tmp_path / "record")})
    rows = rl_rows(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(row["rollout/num_samples"] == 16 * 8 for row in rows)  # both engines' groups
    assert max(row["train/staleness_max"] for row in rows) == 1  # generation overlapped training, within the bound
    assert all(row["train/moe/route_mismatch_frac"] == 0.0 for row in rows)  # routes crossed ranks, replayed
    assert_improves(rows)
    evals = {row["step"] for row in read_metrics(run) if "eval/accuracy" in row}
    assert sorted(evals) == [0, 3, 6]
    recorded = shares(tmp_path / "record")
    assert sorted(recorded) == [1, 2, 3, 4, 5, 6]
    for step_shares in recorded.values():
        assert_whole_true_groups(step_shares)
    assert json.loads((run / "checkpoints" / "step-00000006" / "meta.json").read_text())["world_size"] == 2

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    resumed = leagues_cli("train", "--nproc", "4", *args, "--checkpoint.resume", "true")
    assert "step-00000003 (step 3)" in resumed.stdout
    again = rl_rows(run)  # the rows after step 3 are replaced by the resumed run's
    assert [row["step"] for row in again] == [1, 2, 3, 4, 5, 6]
    assert again[2] == rows[2] and all(row["time"] > rows[-1]["time"] for row in again[3:])
    assert (run / "checkpoints" / "step-00000006" / "rank-1.pt").is_file()


@pytest.mark.slow
def test_two_trainer_ranks_train_what_one_trains(tmp_path):
    """Two steps, on-policy and deterministic, with one trainer rank and with two (two engines each): the same
    per-step metrics and the same final weights, to float tolerance; rollout logprobs equal the trainers' bit for
    bit in both."""
    args = [*EASY, *DISAGGREGATED, "--reward.name", f"{REWARDS}:odd_first_char", "--warm_start.steps", "0"]
    args += ["--steps", "2", "--rollout.batch_size", "8", "--deterministic", "true", "--max_staleness", "0"]
    args += ["--report", "false"]
    for nproc in (3, 4):
        leagues_cli("train", "--nproc", str(nproc), *args, "--run_dir", str(tmp_path / f"nproc{nproc}"))
    one, two = rl_rows(tmp_path / "nproc3"), rl_rows(tmp_path / "nproc4")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        assert a["train/mismatch/abs_diff_max"] == b["train/mismatch/abs_diff_max"] == 0.0
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
    assert abs(one[0]["train/loss"]) > 1e-4  # the samples carried a learning signal
    weights = []
    for nproc in (3, 4):
        dcp_to_torch_save(tmp_path / f"nproc{nproc}" / "checkpoints" / "step-00000002", tmp_path / f"{nproc}.pt")
        weights.append(torch.load(tmp_path / f"{nproc}.pt", weights_only=False)["model"])
    start = load_pretrained(resolve_model_path("tiny-moe")).state_dict()
    assert weights[0].keys() == weights[1].keys() == start.keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-4)
    moved = max(float((weights[0][n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-3  # two steps of lr 3e-3 moved the weights far beyond the tolerance


def test_split_groups_keeps_groups_whole_and_in_order_with_about_equal_tokens():
    lengths = [9, 9, 3, 3, 3, 3, 6, 6, 2, 2]  # five groups of two, of 18, 6, 6, 12 and 4 tokens
    samples = [Sample(prompt_ids=[1], response_ids=[2] * n, group_id=i // 2) for i, n in enumerate(lengths)]
    shares = split_groups(samples, 2)
    assert [s for share in shares for s in share] == samples  # one after another: the batch in its order
    assert [[s.group_id for s in share] for share in shares] == [[0, 0, 1, 1], [2, 2, 3, 3, 4, 4]]
    assert split_groups(samples, 1) == [samples]
    assert [len(share) for share in split_groups(samples[:2], 3)] == [0, 2, 0]  # more ranks than groups: some idle


@pytest.mark.parametrize(
    ("args", "world", "message"),
    [
        (["--num_engine_ranks", "2"], 2, "num_engine_ranks: placement disaggregated needs at least one trainer"),
        (["--num_engine_ranks", "1", "--trainer.parallel.ep", "2"], 4, "trainer.parallel.ep: 2 must divide the 3"),
    ],
)
def test_a_split_that_cannot_run_is_refused_naming_the_knobs(args, world, message):
    cfg = apply_overrides(TrainConfig(), ["--placement", "disaggregated", *args])
    with pytest.raises(ValueError, match=message):
        num_trainer_ranks(cfg, world)
    assert num_trainer_ranks(apply_overrides(TrainConfig(), ["--num_engine_ranks", "2"]), 5) == 3
    with pytest.raises(ValueError, match="num_engine_ranks: must be >= 1"):
        apply_overrides(TrainConfig(), ["--num_engine_ranks", "0"])


def test_the_launcher_refuses_an_impossible_split_before_starting_ranks(tmp_path):
    result = leagues_cli("train", "--nproc", "2", *DISAGGREGATED, "--run_dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert "num_engine_ranks: placement disaggregated needs at least one trainer rank" in result.stderr
    assert "torch.distributed" not in result.stderr and not (tmp_path / "run").exists()  # no rank started
