"""OpenAI's API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Shapes follow OpenAI's API reference, so the official `openai` client works unchanged; the usual
non-OpenAI extras (`top_k`, `min_p`, `ignore_eos`, `stop_token_ids`) are accepted too.

Decisions:
- Chat messages go through the tokenizer's chat template with `add_generation_prompt=True`; the result
  is tokenized without adding special tokens (the template already has them). Text parts of a content
  list are joined; other content types are refused by the schema.
- Choices are prompt-major: choice `i * n + j` is sample `j` of prompt `i` (OpenAI's order).
- `finish_reason` is "stop" or "length" (or "abort" for an aborted request, as vLLM does).
- Logprobs: completions give the legacy object (`tokens`, `token_logprobs`, `top_logprobs` as
  {token: logprob} dicts, `text_offset`); chat gives `{"content": [{token, logprob, bytes, top_logprobs}]}`.
  Token strings are each token decoded alone. Values are the engine's rollout logprobs (see `types.py`).
- Streaming (SSE, then `data: [DONE]`): text deltas as tokens come; a choice's logprobs and its
  `finish_reason` arrive in its last chunk, so concatenating chunks gives the non-streamed answer.
  `stream_options.include_usage` adds a final chunk with `usage` and no choices.
- Without a `max_tokens`, chat completions may run to the context limit, as OpenAI's do.
- Tool calling: `tools` go to the chat template (which renders them as the model family expects), and so do
  assistant `tool_calls` (arguments decoded from their JSON string) and tool messages' `tool_call_id`. The
  output's Qwen/Hermes `<tool_call>` blocks become `tool_calls` (finish reason `tool_calls`); the content is
  the text before the first call (all of it when a block cannot be read). A forced call (`tool_choice`
  required or named) is refused: it would need constrained decoding. Streamed with tools, a choice's text is
  held back and arrives, with its calls, in its last chunk (calls are parsed from the whole text).
"""

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from leagues.agent.tool_calls import parse_tool_calls
from leagues.engine.output import Output
from leagues.serve.api_common import APIError, Batch, ServerState, TextStream, error_body, finite, sse, state_of
from leagues.serve.protocol import ChatCompletionRequest, CompletionRequest

TOOL_CALL_PARSER, TOOL_CALL_START = "hermes", "<tool_call>"
"""The model's tool-call format: Qwen / Hermes blocks (`leagues.agent.tool_calls`)."""

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
async def models(request: Request):
    state = state_of(request)
    card = {
        "id": state.served_model_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "leagues",
        "root": state.model_path,
        "max_model_len": state.engine.max_model_len,
    }
    return {"object": "list", "data": [card]}


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request):
    state = state_of(request)
    prompt = req.prompt
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
    top = req.logprobs or 0
    params = req.sampling(req.max_tokens, top)
    rid = state.new_id("cmpl")
    rids = [f"{rid}-{i}" for i in range(len(prompts))]
    batch = Batch(state, prompts, params, rids, stream=req.stream, field="prompt")
    shell = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": _model(state, req)}
    if req.stream:
        return StreamingResponse(_stream(state, req, batch, shell, chat=False), media_type="text/event-stream")
    outputs = await batch.results()
    choices = [_completion_choice(state, o, i, req.logprobs) for i, o in enumerate(outputs)]
    return shell | {"choices": choices, "usage": _usage(outputs, params.n)}


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = state_of(request)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    prompt = _chat_prompt(state, req)
    params = req.sampling(req.max_new_tokens(state.engine.max_model_len), req.top_logprobs or 0)
    rid = state.new_id("chatcmpl")
    batch = Batch(state, [prompt], params, [rid], stream=req.stream, field="messages")
    shell = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": _model(state, req)}
    if req.stream:
        shell["object"] = "chat.completion.chunk"
        return StreamingResponse(_stream(state, req, batch, shell, chat=True), media_type="text/event-stream")
    outputs = await batch.results()
    choices = [_chat_choice(state, o, req, rid) for o in outputs]
    return shell | {"choices": choices, "usage": _usage(outputs, params.n)}


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> str:
    tok = state.engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise APIError(400, "messages: this model has no tokenizer with a chat template", param="messages")
    if req.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice: only none and auto (a forced call needs constrained decoding, which "
                       "this server does not do)", param="tool_choice")  # fmt: skip
    try:
        messages = [m.as_template_input() for m in req.messages]
    except ValueError as err:
        raise APIError(400, f"messages: {err}", param="messages") from None
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template may raise anything (jinja errors, its own `raise_exception`)
        raise APIError(400, f"messages: the chat template failed: {err}", param="messages") from None


def _parses_tools(req) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def _message(req, o: Output, rid: str) -> tuple[dict, str]:
    """The assistant message of one output, and its finish reason: with tools, the calls the model wrote
    (Hermes/Qwen blocks) become `tool_calls` and the text before the first call the content; when a block
    cannot be read, the content is the whole text as written (the readable calls are still returned)."""
    finish = _finish_reason(o)
    if not _parses_tools(req):
        return {"role": "assistant", "content": o.text}, finish
    calls, errors = parse_tool_calls(o.text, TOOL_CALL_PARSER)
    if not calls:
        return {"role": "assistant", "content": o.text}, finish
    content = o.text if errors else o.text[: o.text.find(TOOL_CALL_START)]
    tool_calls = [
        {"id": f"call_{rid.rsplit('-', 1)[-1]}_{o.index}_{c.index}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in calls
    ]  # fmt: skip
    message = {"role": "assistant", "content": content.strip() or None, "tool_calls": tool_calls}
    return message, "tool_calls" if finish == "stop" else finish


def _model(state: ServerState, req) -> str:
    return req.model or state.served_model_name


def _finish_reason(o: Output) -> str:
    return str(o.finish_reason)


def _usage(outputs: list[Output], n: int) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs[::n])
    completion = sum(len(o.token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in outputs[::n])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_str(state: ServerState, token_id: int) -> str:
    tok = state.engine.tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)


def _completion_logprobs(state: ServerState, o: Output, k: int) -> dict:
    tokens = [_token_str(state, t) for t in o.token_ids]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = None
    if k > 0:
        top = [{_token_str(state, t): finite(lp) for t, lp in position} for position in o.top_logprobs]
    return {
        "tokens": tokens,
        "token_logprobs": [finite(lp) for lp in o.logprobs],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _completion_choice(state: ServerState, o: Output, index: int, logprobs: int | None) -> dict:
    lp = _completion_logprobs(state, o, logprobs) if logprobs is not None else None
    return {"index": index, "text": o.text, "logprobs": lp, "finish_reason": _finish_reason(o)}


def _chat_entry(state: ServerState, token_id: int, logprob: float) -> dict:
    token = _token_str(state, token_id)
    return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode())}


def _chat_logprobs(state: ServerState, o: Output) -> dict:
    content = []
    for i, (t, lp) in enumerate(zip(o.token_ids, o.logprobs, strict=True)):
        entry = _chat_entry(state, t, lp)
        top = o.top_logprobs[i] if i < len(o.top_logprobs) else []
        entry["top_logprobs"] = [_chat_entry(state, tt, tlp) for tt, tlp in top]
        content.append(entry)
    return {"content": content}


def _chat_choice(state: ServerState, o: Output, req, rid: str) -> dict:
    message, finish = _message(req, o, rid)
    return {
        "index": o.index,
        "message": message,
        "logprobs": _chat_logprobs(state, o) if req.logprobs else None,
        "finish_reason": finish,
    }


# --- streaming ----------------------------------------------------------------------------------------


async def _stream(state: ServerState, req, batch: Batch, shell: dict, chat: bool):
    n = batch.params.n
    streams: dict[int, TextStream] = {}
    outputs: list[Output] = []
    try:
        async for event in batch.events():
            if event[0] == "token":
                _, index, token_id, logprob = event
                if index not in streams:
                    streams[index] = TextStream(state.engine.tokenizer, batch.params.stop)
                    if chat:  # OpenAI opens every choice with the role
                        yield sse(shell | {"choices": [_delta(index, {"role": "assistant", "content": ""})]})
                delta = streams[index].add(token_id, logprob)
                if delta and not (chat and _parses_tools(req)):  # calls are parsed from the whole text
                    yield sse(shell | {"choices": [_piece(index, delta, chat)]})
            else:
                for o in event[2]:
                    index = event[1] * n + o.index
                    text = streams.setdefault(index, TextStream(state.engine.tokenizer, [])).finish(o.text)
                    yield sse(shell | {"choices": [_last_piece(state, req, o, index, text, chat, shell["id"])]})
                    outputs.append(o)
    except ValueError as err:
        yield sse(error_body(str(err), "invalid_request_error", None, 400))
    if req.stream_options is not None and req.stream_options.include_usage and outputs:
        yield sse(shell | {"choices": [], "usage": _usage(outputs, n)})
    yield sse("[DONE]")


def _delta(index: int, delta: dict, **extra) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None} | extra


def _piece(index: int, text: str, chat: bool) -> dict:
    if chat:
        return _delta(index, {"content": text})
    return {"index": index, "text": text, "logprobs": None, "finish_reason": None}


def _last_piece(state: ServerState, req, o: Output, index: int, text: str, chat: bool, rid: str) -> dict:
    if chat:
        logprobs = _chat_logprobs(state, o) if req.logprobs else None
        if not _parses_tools(req):
            return _delta(index, {"content": text}, logprobs=logprobs, finish_reason=_finish_reason(o))
        message, finish = _message(req, o, rid)
        delta = {"content": message["content"]}
        if "tool_calls" in message:  # a streamed call carries its index among the choice's calls
            delta["tool_calls"] = [{"index": i} | call for i, call in enumerate(message["tool_calls"])]
        return _delta(index, delta, logprobs=logprobs, finish_reason=finish)
    logprobs = _completion_logprobs(state, o, req.logprobs) if req.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(o)}
