"""The run report from a synthetic `metrics.jsonl`: PNGs, `summary.md` numbers, errors, and `run_report`."""

import json

import pytest

from leagues.cli import UsageError
from leagues.cli.report import ReportConfig, run_report
from leagues.obs.report import read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_rows(num_steps=12, mismatch=True):
    rows = []
    for step in range(1, num_steps + 1):
        row = {
            "step": step,
            "time": 1_700_000_000.0 + 10.0 * step,
            "rollout/reward_mean": 0.1 * step,
            "rollout/reward_std": 0.05,
            "rollout/pass_rate": 0.05 * step,
            "rollout/response_len_mean": 200.0 + step,
            "rollout/response_len_max": 512.0,
            "rollout/truncated_frac": 0.1,
            "rollout/tokens_per_s": 1000.0,
            "train/loss": 1.0 / step,
            "train/tokens_per_s": 4000.0,
            "time/rollout": 6.0,
            "time/train": 3.0,
            "time/idle": 1.0,
            "time/step": 10.0,
        }
        if mismatch:
            row |= {"train/mismatch/abs_mean": 0.01, "train/mismatch/kl": 0.001 * step}
        if step % 5 == 0:
            row |= {"eval/accuracy": 0.1 * step, "eval/response_len_mean": 300.0}
        rows.append(row)
    rows[-1]["rollout/reward_std"] = None  # a non-finite value, written as null
    return rows


def write_run(run_dir, rows, config=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (run_dir / "config.yaml").write_text("train:\n  lr: 1.0e-06\n")
    return run_dir


def test_report_writes_valid_pngs_and_the_right_numbers(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(), config=True)
    files = write_report(run)
    names = [p.name for p in files]
    assert names == ["reward.png", "lengths.png", "time.png", "mismatch.png", "summary.md"]
    assert all(p.parent == run / "report" for p in files)
    for png in files[:-1]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    summary = (run / "report" / "summary.md").read_text()
    assert "| reward mean (`rollout/reward_mean`) | 0.1 | 1.2 | 1.2 | 12 |" in summary
    assert "| pass rate (`rollout/pass_rate`) | 0.05 | 0.6 | 0.6 | 12 |" in summary
    assert "| eval accuracy (`eval/accuracy`) | 0.5 | 1 | 1 | 10 |" in summary
    assert "Steps: 12 logged, step 1 to 12" in summary
    assert "Mean step time: 10 s over 12 steps." in summary
    assert "| rollout | 6 | 60.0% |" in summary and "| idle | 1 | 10.0% |" in summary
    assert "rollout 1000 tokens/s, train 4000 tokens/s" in summary
    assert "[`config.yaml`](../config.yaml)" in summary
    for name in names[:-1]:
        assert f"]({name})" in summary


def test_report_skips_mismatch_without_mismatch_keys(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(num_steps=3, mismatch=False))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mismatch.png").write_bytes(b"stale")
    files = write_report(run, tmp_path / "out")
    assert [p.name for p in files] == ["reward.png", "lengths.png", "time.png", "summary.md"]
    assert not (tmp_path / "out" / "mismatch.png").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "`mismatch.png` not written: no mismatch metrics logged." in summary
    assert "| eval accuracy (`eval/accuracy`) | not logged |" in summary
    assert "config.yaml" not in summary


def test_bad_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(num_steps=3))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "x": 1.0}\n{"no_step": true}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5: expected a JSON object with an integer 'step'"):
        read_metrics(run / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        write_report(tmp_path)


def test_rows_of_one_step_merge_and_the_last_value_wins(tmp_path):
    rows = [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 2, "x": 20.0}, {"step": 1, "eval/accuracy": 0.5}]
    run = write_run(tmp_path / "run", rows)
    assert read_metrics(run / "metrics.jsonl") == [{"step": 1, "x": 1.0, "eval/accuracy": 0.5}, {"step": 2, "x": 20.0}]


def test_run_report(tmp_path, capsys):
    run = write_run(tmp_path / "run", synthetic_rows(num_steps=4))
    assert run_report(ReportConfig(run_dir=str(run), out=str(tmp_path / "rep"))) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"summary: {tmp_path / 'rep' / 'summary.md'}"
    assert len(lines) == 6 and (tmp_path / "rep" / "time.png").is_file()
    with pytest.raises(UsageError, match="--run_dir"):
        run_report(ReportConfig())
    with pytest.raises(UsageError, match="no metrics file"):
        run_report(ReportConfig(run_dir=str(tmp_path)))


def test_partial_runs_plot_without_warnings(tmp_path, recwarn):
    rows = [{"step": s, "eval/accuracy": 0.5, "rollout/truncated_frac": 0.0, "time/step": 1.0} for s in (1, 2)]
    files = write_report(write_run(tmp_path / "run", rows))
    assert [p.name for p in files] == ["reward.png", "lengths.png", "time.png", "summary.md"]
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_expert_load_heat_map(tmp_path):
    from leagues.obs.report import write_report

    rows = [
        {"step": s, "train/moe/load_max_over_mean/layer0": 1.0 + s, "train/moe/load_max_over_mean/layer1": 2.0}
        for s in range(1, 5)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_report(tmp_path)
    heat = tmp_path / "report" / "expert_load.png"
    assert heat in paths and heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
