"""Bad input through the `leagues` command, one row per case: the error names the place (file, line, field or
key), comes before any model weights are read, and leaves no run directory (or output) behind.

"Before the model loads" is checked for real: every command runs on a copy of the built-in tiny MoE without its
weights file, so a case that reached the model would fail with a different error (a missing safetensors file).
"""

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from leagues.cli.main import main
from leagues.model import resolve_model_path


@pytest.fixture(scope="module")
def weightless(tmp_path_factory) -> Path:
    """The tiny MoE's config and tokenizer, without `model.safetensors`."""
    src, dst = resolve_model_path("tiny-moe"), tmp_path_factory.mktemp("weightless")
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    return dst


def files(tmp: Path) -> dict[str, Path]:
    """The inputs the cases point at (written fresh for each case)."""
    tmp.mkdir(parents=True, exist_ok=True)
    texts = {
        "ok.jsonl": '{"prompt": "1+1=", "label": "2", "response": "2"}\n',
        "bad_json.jsonl": '{"prompt": "1+1=", "label": "2"}\n{"prompt": "2+2=", \n',
        "no_prompt.jsonl": '{"prompt": "1+1=", "label": "2"}\n\n{"question": "2+2=", "label": "4"}\n',
        "long.jsonl": json.dumps({"prompt": "1+" * 3000, "label": "2", "response": "2"}) + "\n",
        "empty.jsonl": "",
        "no_response.jsonl": '{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n',
        "reward_args.py": "import math\n\n\ndef fn(answer, label):\n    return 1.0\n",
        "reward_syntax.py": "def fn(response):\n    return (1.0\n",
    }
    for name, text in texts.items():
        (tmp / name).write_text(textwrap.dedent(text))
    return {name: tmp / name for name in texts}


TRAIN = "train --obs.tensorboard false --obs.console false --steps 1"
CASES = {  # name: (arguments, the error's text); {name} is an input file of `files`, {dir} their folder
    "reward file missing": (f"{TRAIN} --data {{ok}} --reward.name {{dir}}/nope.py:fn", "file not found: {dir}/nope.py"),
    "reward parameter": (f"{TRAIN} --data {{ok}} --reward.name {{reward_args}}:fn", "{reward_args}:4): parameter"),
    "reward syntax": (f"{TRAIN} --data {{ok}} --reward.name {{reward_syntax}}:fn", "reward_syntax.py, line 2"),
    "reward name": (f"{TRAIN} --data {{ok}} --reward.name nosuch", "RewardConfig.name: unknown reward 'nosuch'"),
    "generate function": (f"{TRAIN} --task arithmetic --rollout.generate_fn no.mod:gen", "no.mod:gen': cannot load"),
    "data json": (f"{TRAIN} --data {{bad_json}} --reward.name exact", "{bad_json}:2: invalid JSON"),
    "data field": (f"{TRAIN} --data {{no_prompt}} --reward.name exact", "{no_prompt}:3: field 'prompt': missing"),
    "data prompt length": (f"{TRAIN} --data {{long}} --reward.name exact", "{long}:1: prompt has 6019 tokens"),
    "data empty": (f"{TRAIN} --data {{empty}} --reward.name exact", "{empty}: no prompts left"),
    "data missing": (f"{TRAIN} --data {{dir}}/none.jsonl --reward.name exact", "{dir}/none.jsonl"),
    "save_every": (f"{TRAIN} --task arithmetic --checkpoint.every -1", "checkpoint.every: must be >= 0"),
    "unknown key": (f"{TRAIN} --task arithmetic --trainer.optim.lrr 1", "trainer.optim.lrr"),
    "sft epochs": ("sft --data {ok} --epochs 0", "epochs: must be >= 1, got 0"),
    "sft empty": ("sft --data {empty}", "{empty}: no prompt/response pairs"),
    "sft field": ("sft --data {no_response}", "{no_response}:2: field 'response'"),
    "sft prompt length": ("sft --data {long}", "{long}:1: 6021 tokens, over the model's context of 2048"),
    "eval reward": ("eval --data {ok} --reward.name {reward_args}:fn", "({reward_args}:4): parameter 'answer'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_before_the_model_loads(case, weightless, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    paths = {name.removesuffix(".jsonl").removesuffix(".py"): str(p) for name, p in files(tmp_path / "in").items()}
    paths["dir"] = str(tmp_path / "in")
    argv, expected = CASES[case]
    argv = [arg.format(**paths) for arg in argv.split()]
    out = tmp_path / "out"
    verb_out = {"train": ["--run_dir", str(out)], "sft": ["--out", str(out)], "eval": ["--out", str(out)]}
    code = main([*argv, "--model", str(weightless), *verb_out[argv[0]]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("leagues: error: ") and expected.format(**paths) in err, err
    assert "safetensors" not in err and not out.exists()
    assert not (tmp_path / "runs").exists()
