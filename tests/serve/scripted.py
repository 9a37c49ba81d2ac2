"""A served model that follows a script: the tiny MoE with its output layer fitted (cross-entropy on the final
hidden states) so that greedy decoding of each scripted prompt writes its reply, then the stop token. A real
checkpoint that thinks, calls a tool, or continues a prefilled call, made in a second.

The script: "2+3?" is answered with a think block and a call; "hi" with a plain greeting, and, after the opening
of a forced call (`<tool_call>\\n`, which the named-function opening continues), with a call of `add`."""

import os
import subprocess
import sys

import torch

from leagues.model import ForwardBatch, load_pretrained, load_tokenizer, resolve_model_path, save_pretrained
from tests.serve.test_server import _wait_url

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
THOUGHT = "sum"
REPLY = f"<think>{THOUGHT}</think>\n\n{CALL}"
USER = [{"role": "user", "content": "2+3?"}]
HI = [{"role": "user", "content": "hi"}]
HELLO = "hello"
FORCED = '{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>'
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}
SCRIPT = [(USER, "", REPLY), (HI, "", HELLO), (HI, "<tool_call>\n", FORCED)]
"""(messages, the text the server writes after the generation prompt, the reply)."""


def write_scripted_model(path) -> None:
    source = resolve_model_path("tiny-moe")
    tok, model = load_tokenizer(source), load_pretrained(source, dtype=torch.float32)
    hidden, targets = [], []
    for messages, prefill, reply in SCRIPT:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
        start = len(tok.encode(prompt, add_special_tokens=False))
        ids = tok.encode(prompt + reply, add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            batch = ForwardBatch.packed(torch.tensor(ids[:-1]), [len(ids) - 1])
            hidden.append(model.run(batch).hidden_TD[start - 1 :])
        targets.append(torch.tensor(ids[start:]))
    hidden_TD, target_T = torch.cat(hidden), torch.cat(targets)
    w_VD = model.lm_head.weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_VD], lr=0.05)
    for _ in range(2000):  # until every scripted token wins by a margin the engine's numerics cannot flip
        logits_TV = hidden_TD @ w_VD.T
        top2 = logits_TV.detach().topk(2, -1).values
        if (logits_TV.argmax(-1) == target_T).all() and (top2[:, 0] - top2[:, 1]).min() > 4:
            break
        loss = torch.nn.functional.cross_entropy(logits_TV, target_T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        raise RuntimeError("the script could not be fitted")
    with torch.no_grad():
        model.lm_head.weight.copy_(w_VD)
    save_pretrained(model, path)
    tok.save_pretrained(path)


def serve(path) -> tuple[subprocess.Popen, str]:
    """`leagues serve` of `path` on a free loopback port; (the process, its URL)."""
    cmd = [sys.executable, "-m", "leagues.cli", "serve", "--model", str(path), "--port", "0"]
    cmd += ["--engine.num_blocks", "256", "--engine.max_model_len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    return proc, _wait_url(proc, timeout=120)
