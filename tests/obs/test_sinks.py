"""Metrics sinks on real files and a real HTTP port: JSONL rows and resume, TensorBoard events read back,
Prometheus scraped over HTTP, fan-out and the rank-0 rule of `build_sinks`."""

import json
import math
import socket

import httpx
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from leagues.config import from_dict
from leagues.obs import JSONLSink, MultiSink, NullSink, ObsConfig, PrometheusSink, TensorBoardSink, build_sinks
from leagues.obs.sinks import prometheus_name


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jsonl_writes_one_flushed_row_per_step(tmp_path):
    sink = JSONLSink(tmp_path)
    sink.log(1, {"rollout/reward_mean": 0.5, "rollout/num_samples": 64, "step": 1})
    # flushed before close: a crash keeps every finished step
    assert read_rows(tmp_path / "metrics.jsonl")[0]["rollout/reward_mean"] == 0.5
    sink.log(2, {"rollout/reward_mean": 0.75, "eval/accuracy": 0.25})
    sink.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rollout/num_samples"] == 64 and isinstance(rows[0]["rollout/num_samples"], int)
    assert "eval/accuracy" not in rows[0] and rows[1]["eval/accuracy"] == 0.25
    assert all(isinstance(r["time"], float) for r in rows)


def test_jsonl_non_finite_values_become_null(tmp_path):
    sink = JSONLSink(tmp_path)
    sink.log(1, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5})
    sink.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    row = json.loads(line)
    assert (row["a"], row["b"], row["c"], row["d"]) == (None, None, None, 1.5)


def test_jsonl_resume_drops_rows_after_the_resume_step(tmp_path):
    sink = JSONLSink(tmp_path)
    for step in range(1, 6):
        sink.log(step, {"x": float(step)})
    sink.close()
    sink = JSONLSink(tmp_path, resume_step=3)
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    sink.log(4, {"x": 40.0})
    sink.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left behind


def test_jsonl_resume_drops_a_torn_last_line_but_not_damage_before_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')
    JSONLSink(tmp_path, resume_step=5).close()
    assert [r["step"] for r in read_rows(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        JSONLSink(tmp_path, resume_step=5)


def test_tensorboard_scalars_read_back(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.log(1, {"rollout/reward_mean": 0.25, "train/loss": 1.5})
    sink.log(2, {"rollout/reward_mean": 0.5, "train/loss": 1.25, "eval/accuracy": 0.75})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"rollout/reward_mean", "train/loss", "eval/accuracy"}
    assert [(e.step, e.value) for e in acc.Scalars("rollout/reward_mean")] == [(1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(2, 0.75)]


def test_prometheus_exporter_serves_gauges_over_http():
    sink = PrometheusSink(free_port(), addr="127.0.0.1")
    try:
        sink.log(7, {"rollout/reward_mean": 0.625, "train/kl/mean": 0.001, "time/step": 12.5})
        text = httpx.get(f"http://127.0.0.1:{sink.port}/metrics", timeout=5).text
        assert "leagues_step 7.0" in text
        assert "leagues_rollout_reward_mean 0.625" in text
        assert "leagues_train_kl_mean 0.001" in text
        assert "leagues_time_step 12.5" in text
        sink.log(8, {"rollout/reward_mean": 0.75})  # a later step overwrites; missing keys keep their value
        text = httpx.get(f"http://127.0.0.1:{sink.port}/metrics", timeout=5).text
        assert "leagues_rollout_reward_mean 0.75" in text and "leagues_time_step 12.5" in text
    finally:
        sink.close()


def test_prometheus_names_and_collisions():
    assert prometheus_name("train/mismatch/abs_mean") == "leagues_train_mismatch_abs_mean"
    assert prometheus_name("rollout/tokens-per-s") == "leagues_rollout_tokens_per_s"
    sink = PrometheusSink()  # port 0: nothing served, the registry is still readable
    with pytest.warns(UserWarning, match="train_kl"):
        sink.log(1, {"train/kl": 1.0, "train_kl": 2.0})
    assert sink.registry.get_sample_value("leagues_train_kl") == 1.0
    sink.close()


class Recorder:
    def __init__(self):
        self.calls = []

    def log(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.calls.append("closed")


def test_multisink_fans_out_and_closes_all():
    a, b = Recorder(), Recorder()
    sink = MultiSink([a, b])
    sink.log(3, {"x": 1.0})
    sink.close()
    assert a.calls == b.calls == [(3, {"x": 1.0}), "closed"]


def test_build_sinks_on_rank_zero_and_elsewhere(tmp_path):
    cfg = ObsConfig(console=False)
    sink = build_sinks(cfg, tmp_path / "run", total_steps=10)
    assert [type(s).__name__ for s in sink.sinks] == ["JSONLSink", "TensorBoardSink"]
    sink.log(1, {"train/loss": 0.5})
    sink.close()
    assert read_rows(tmp_path / "run" / "metrics.jsonl")[0]["train/loss"] == 0.5
    assert isinstance(build_sinks(cfg, tmp_path / "other", total_steps=10, rank=1), NullSink)
    assert not (tmp_path / "other").exists()


def test_obs_config_from_dict_and_bad_values():
    cfg = from_dict(ObsConfig, {"prometheus_port": 9400, "console_keys": ["train/loss"]})
    assert cfg.prometheus_port == 9400 and cfg.console_keys == ["train/loss"] and cfg.jsonl
    assert "rollout/reward_mean" in ObsConfig().console_keys
    with pytest.raises(ValueError, match="prometheus_port"):
        ObsConfig(prometheus_port=70000)
