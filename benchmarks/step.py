"""The colocated GRPO step beside TRL's `GRPOTrainer`, on one GPU, in one call.

Workload `anchor` (ANCHORS.md): the 1.27B Qwen3-MoE shape with random weights and the character vocabulary,
prompts "a+b=" (a < 40, b < 8), reward `len(response) % 3 == 0`, 16 prompts x 8 samples, temperature 1,
`max_response_len` from `--lens`. leagues runs through its public CLI (`leagues train ...`), TRL (when
installed) through `GRPOTrainer` without vLLM, both on the same checkpoint. Workload `tiny`: `make run`'s
recipe (the built-in tiny MoE), step time only.

One row per (impl, max_response_len) to $OUT/step.jsonl: `impl` (leagues or trl), `max_response_len`,
`step_s` (median after the warm-up steps), and for leagues `rollout_s`, `train_s`, `sync_s`, `sleep_s` (medians)
with the response length and the run's flags.

    PYTHONPATH=. python benchmarks/step.py [--workload anchor|tiny] [--impls leagues,trl] [--lens 128,1024]
        [--steps 8] [--warmup 2] [-- extra leagues overrides ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.train_step import SHAPES

REWARD = """
def reward(prompt, response, label, metadata):
    return float(len(response) % 3 == 0)
"""

# the ANCHORS.md shape of train_step.py, with the character vocabulary of our tokenizer
ANCHOR = {k: v for k, v in SHAPES["anchor"].items() if k != "vocab_size"} | {"max_position_embeddings": 4096}


def out_path() -> Path:
    return Path(os.environ.get("OUT", "/tmp")) / "step.jsonl"


def write_row(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out_path(), "a") as f:
        f.write(json.dumps(row) + "\n")


def make_anchor(path: Path) -> None:
    """The ANCHORS.md checkpoint: HF's own initialisation of the shape, bfloat16, our character tokenizer."""
    import torch
    import transformers

    from leagues.model.tokenizer import write_tiny_tokenizer

    if (path / "config.json").is_file():
        return
    write_tiny_tokenizer(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **ANCHOR
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)


def prompts() -> list[str]:
    return [f"{a}+{b}=" for a in range(40) for b in range(8)]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def run_leagues(args, model: Path, work: Path, max_len: int, extra: list[str]) -> dict:
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": ""}) + "\n" for p in prompts()))
    (work / "step_reward.py").write_text(REWARD)
    run_dir = work / f"run-{max_len}-{int(time.time())}"
    if args.workload == "tiny":
        cmd = ["--recipe", "tiny-arithmetic", "--steps", str(args.steps), "--eval.every", "0"]
    else:
        cmd = [
            "--model", str(model), "--data.path", str(data), "--data.chat_template", "false",
            "--reward", f"{work / 'step_reward.py'}:reward",
            "--rollout.batch_size", "16", "--rollout.n_samples_per_prompt", "8",
            "--rollout.max_response_len", str(max_len), "--steps", str(args.steps),
        ]  # fmt: skip
    cmd += ["--checkpoint.enabled", "false", "--report", "false", "--run_dir", str(run_dir), *extra]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leagues.cli", "train", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"impl": "leagues", "max_response_len": max_len, "error": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[args.warmup :] or rows
    get = lambda key: median([r[key] for r in timed if key in r])  # noqa: E731
    return {
        "impl": "leagues",
        "workload": args.workload,
        "max_response_len": max_len,
        "step_s": get("time/step"),
        "rollout_s": get("time/rollout"),
        "train_s": get("time/train"),
        "sync_s": get("time/sync"),
        "sleep_s": get("time/sleep") if any("time/sleep" in r for r in timed) else 0.0,
        "reward_s": get("time/reward"),
        "response_len_mean": get("rollout/response_len_mean"),
        "sync_gb_per_s": get("sync/gb_per_s"),
        "steps_timed": len(timed),
        "wall_s": round(wall, 1),
        "extra": extra,
    }


TRL_SCRIPT = """
import json, sys, tempfile, time
import datasets, torch, transformers as tf, trl
from trl import GRPOConfig, GRPOTrainer
path, max_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = tf.AutoTokenizer.from_pretrained(path)
ds = datasets.Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(40) for b in range(8)])
def reward(completions, **kw):
    return [float(len(c) % 3 == 0) for c in completions]
args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=128, num_generations=8,
                  max_completion_length=max_len, bf16=True, logging_steps=1, max_steps=steps, report_to="none",
                  use_vllm=False, gradient_accumulation_steps=1, save_strategy="no", temperature=1.0)
model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok)
times = []
class Timer(tf.TrainerCallback):
    def on_step_begin(self, a, s, c, **k): self.t = time.time()
    def on_step_end(self, a, s, c, **k): torch.cuda.synchronize(); times.append(time.time() - self.t)
trainer.add_callback(Timer())
trainer.train()
print("TIMES " + json.dumps({"times": times, "trl": trl.__version__}))
"""


def run_trl(args, model: Path, work: Path, max_len: int) -> dict:
    script = work / "trl_step.py"
    script.write_text(TRL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(max_len), str(args.steps)], capture_output=True, text=True
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TIMES ")), None)
    if line is None:
        return {"impl": "trl", "max_response_len": max_len, "error": (proc.stderr or proc.stdout)[-3000:]}
    result = json.loads(line[6:])
    times = result["times"]
    return {
        "impl": "trl",
        "trl": result["trl"],
        "max_response_len": max_len,
        "step_s": median(times[args.warmup :] or times),
        "steps": [round(t, 2) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="anchor", choices=["anchor", "tiny"])
    parser.add_argument("--impls", default="leagues,trl")
    parser.add_argument("--lens", default="128")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default=None, help="checkpoint directory (made once if absent)")
    parser.add_argument("--tag", default="", help="a label kept in the rows")
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    work = Path(tempfile.mkdtemp(prefix="leagues-step-"))
    model = Path(args.model or "/tmp/leagues-anchor-1b")
    if args.workload == "anchor":
        make_anchor(model)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lens = [8] if args.workload == "tiny" else [int(x) for x in args.lens.split(",")]  # tiny: the recipe's 8
    for max_len in lens:
        for impl in args.impls.split(","):
            if impl == "trl" and args.workload != "anchor":
                continue
            row = (
                run_leagues(args, model, work, max_len, extra)
                if impl == "leagues"
                else run_trl(args, model, work, max_len)
            )
            write_row(row | {"card": card, "date": time.strftime("%Y-%m-%d"), "tag": args.tag})


if __name__ == "__main__":
    main()
