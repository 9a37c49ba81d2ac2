"""Monitoring: the trainer's Prometheus exporter, scraped over HTTP in the middle of a real run, exports every
metric the Grafana dashboard in docs/grafana plots."""

import json
import re
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from leagues.config import apply_overrides
from leagues.loop import TrainConfig, train
from tests.loop.test_loop import REWARDS

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "leagues-trainer.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_metrics() -> dict[str, set[str]]:
    """Each panel's title -> the `leagues_*` metric names its queries use."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    names = r"\bleagues_[A-Za-z0-9_]+"
    return {p["title"]: {m for t in p["targets"] for m in re.findall(names, t["expr"])} for p in panels}


def test_every_dashboard_metric_is_exported_by_a_running_trainer(tmp_path, monkeypatch):
    port = free_port()
    scrape = tmp_path / "scrape.txt"
    monkeypatch.setenv("LEAGUES_TEST_SCRAPE_URL", f"http://127.0.0.1:{port}/metrics")
    monkeypatch.setenv("LEAGUES_TEST_SCRAPE_OUT", str(scrape))
    args = [
        "--task", "arithmetic",
        "--reward.name", f"{REWARDS}:scrape_exporter",
        "--steps", "2",
        "--checkpoint.every", "1",
        "--eval.every", "1",
        "--eval.num_prompts", "2",
        "--rollout.batch_size", "2",
        "--rollout.n_samples_per_prompt", "2",
        "--rollout.max_response_len", "3",
        "--obs.tensorboard", "false",
        "--obs.console", "false",
        "--obs.prometheus_port", str(port),
        "--obs.prometheus_addr", "127.0.0.1",
        "--run_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    train(apply_overrides(TrainConfig(), args))
    # the last scrape ran in the final evaluation's reward, after step 1 was exported
    exported = {family.name for family in text_string_to_metric_families(scrape.read_text())}
    assert "leagues_step" in exported
    panels = dashboard_metrics()
    assert len(panels) >= 10 and all(panels.values()), panels
    missing = {title: names - exported for title, names in panels.items() if names - exported}
    assert not missing, f"dashboard panels plot metrics the exporter does not have: {missing}"
    used = set().union(*panels.values())
    for needed in ("leagues_rollout_reward_mean", "leagues_eval_accuracy", "leagues_time_rollout", "leagues_time_train",
                   "leagues_train_tokens_per_s", "leagues_train_mismatch_kl_k3", "leagues_sync_weight_version",
                   "leagues_rollout_retried", "leagues_rollout_failed"):  # fmt: skip
        assert needed in used, needed
