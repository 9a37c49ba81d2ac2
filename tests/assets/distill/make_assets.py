"""Makes the two checkpoints of the distillation test (`test_distillation_closes_most_of_the_gap_to_the_teacher`
in tests/loop/test_loop.py): `teacher/` and `student/` beside this file.

Both come from one run of `make run`'s recipe (`leagues train --recipe tiny-arithmetic`: the built-in tiny MoE,
an SFT warm start of 1,000 steps on the arithmetic task, then 500 GRPO steps):
- student/: the SFT warm start: the task's format, about 30% held-out greedy accuracy;
- teacher/: the policy after the 500 GRPO steps (its last checkpoint through `leagues convert`), about 83%.

Both are written in bfloat16 (about 0.5 MB of weights each; the loaders cast to float32, and held-out accuracy
moves by less than a point), with the tokenizer files of the warm start, so each is a complete checkpoint
directory that `--model` and `--distill.teacher` take as they are.

Everything is seeded (the recipe's seed 0), so a rerun on the same machine writes the same files (checked: a
fresh run rewrote both byte for byte); another CPU may round differently and give slightly different weights.
The run takes about 7 minutes on a 2-core CPU, more on a busy one.

Usage, from the repository root:

    python tests/assets/distill/make_assets.py [--work DIR]

`--work`: where the run goes (default: a new temporary directory); a run already finished there is reused.
Prints the held-out accuracy of both checkpoints (1,024 prompts, seed 0, as the test measures them).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
STEPS = 500  # the recipe's GRPO steps


def leagues(*args: str, capture: bool = False) -> str:
    """Run a `leagues` verb with this interpreter; its stdout when `capture` (else it goes to ours)."""
    cmd = [sys.executable, "-m", "leagues.cli", *args]
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"leagues {args[0]} failed (exit {result.returncode})")
    return result.stdout or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="directory of the run (default: a temporary one)")
    work = parser.parse_args().work or Path(tempfile.mkdtemp(prefix="leagues-distill-assets-"))
    run = work / "teacher-run"
    last = run / "checkpoints" / f"step-{STEPS:08d}"
    if not last.is_dir():
        leagues(
            "train", "--recipe", "tiny-arithmetic", "--steps", str(STEPS), "--run_dir", str(run),
            "--checkpoint.every", str(STEPS), "--obs.tensorboard", "false", "--report", "false",
        )  # fmt: skip
    teacher, student = HERE / "teacher", HERE / "student"
    leagues("convert", "--model", str(run / "warm_start"), "--checkpoint", str(last), "--out", str(teacher),
            "--dtype", "bfloat16")  # fmt: skip
    leagues("convert", "--model", str(run / "warm_start"), "--out", str(student), "--dtype", "bfloat16")
    for path in (teacher, student):
        out = leagues("eval", "--model", str(path), "--task", "arithmetic", "--num_prompts", "1024",
                      "--max_response_len", "4", capture=True)  # fmt: skip
        accuracy = json.loads(out.strip().splitlines()[-1])["accuracy"]
        print(f"{path.relative_to(ROOT)}: held-out accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
