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
  output's Qwen/Hermes `<tool_call>` blocks become `tool_calls` (finish reason `tool_calls`), and a Qwen3 think
  block `reasoning_content` (`reply.py` reads both, streamed or not).
- A forced call (`tool_choice` "required" or a named function) is prefilled, not constrained: the prompt ends
  with the opening of a call (`reply.call_prefill`), and the model writes the rest, so its arguments are its
  own and may not parse (then the content is the whole text, the opening included, and there is no call).
- Streamed chat: reasoning and content deltas as tokens come, each call whole once its block closes (`reply.py`
  holds back what a later token could change); a choice's logprobs and finish reason come in its last chunk.
"""

import time
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from leagues.engine.output import Output
from leagues.serve.api_common import (
    APIError,
    Batch,
    PendingTokens,
    ServerState,
    admit,
    error_body,
    finite,
    off_loop_if_large,
    state_of,
)
from leagues.serve.engine_process import EngineGone
from leagues.serve.protocol import ChatCompletionRequest, CompletionRequest
from leagues.serve.reply import Reply, TextStream, call_prefill, opens_thinking, sse

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
    ids = await off_loop_if_large(request, admit, state, prompts, params, "prompt")
    batch = Batch(state, ids, params, rids, stream=req.stream, field="prompt")
    shell = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": _model(state, req)}
    if req.stream:
        return StreamingResponse(_stream(state, req, batch, shell, None), media_type="text/event-stream")
    outputs = await batch.results()
    choices = [_completion_choice(state, o, i, req.logprobs) for i, o in enumerate(outputs)]
    return shell | {"choices": choices, "usage": _usage(outputs, params.n)}


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = state_of(request)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    prompt = await off_loop_if_large(request, _chat_prompt, state, req)
    thinking = opens_thinking(prompt)
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    try:
        prefill = call_prefill(choice, [t.function.name for t in req.tools or []], thinking)
    except ValueError as err:
        raise APIError(400, str(err), param="tool_choice") from None
    params = req.sampling(req.max_new_tokens(state.engine.max_model_len), req.top_logprobs or 0)
    rid = state.new_id("chatcmpl")
    ids = await off_loop_if_large(request, admit, state, [prompt + prefill], params, "messages")
    batch = Batch(state, ids, params, [rid], stream=req.stream, field="messages")
    shell = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": _model(state, req)}
    reply = partial(_reply, req, thinking, prefill, rid)
    if req.stream:
        shell["object"] = "chat.completion.chunk"
        return StreamingResponse(_stream(state, req, batch, shell, reply), media_type="text/event-stream")
    outputs = await batch.results()
    choices = [_chat_choice(state, o, req, reply(o.index)) for o in outputs]
    return shell | {"choices": choices, "usage": _usage(outputs, params.n)}


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> str:
    tok = state.engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise APIError(400, "messages: this model has no tokenizer with a chat template", param="messages")
    try:
        messages = [m.as_template_input() for m in req.messages]
    except ValueError as err:
        raise APIError(400, f"messages: {err}", param="messages") from None
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template may raise anything (jinja errors, its own `raise_exception`)
        raise APIError(400, f"messages: the chat template failed: {err}", param="messages") from None


def _reply(req: ChatCompletionRequest, thinking: bool, prefill: str, rid: str, index: int) -> Reply:
    """The reply reader of choice `index`: calls are read with tools unless tool_choice is none."""
    tools = bool(req.tools) and req.tool_choice != "none"
    call_id = partial("call_{}_{}_{}".format, rid.rsplit("-", 1)[-1], index)
    return Reply(tools=tools, thinking=thinking, prefill=prefill, call_id=call_id)


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


def _chat_choice(state: ServerState, o: Output, req, reply: Reply) -> dict:
    message, finish = reply.message(o.text, _finish_reason(o))
    return {
        "index": o.index,
        "message": message,
        "logprobs": _chat_logprobs(state, o) if req.logprobs else None,
        "finish_reason": finish,
    }


# --- streaming ----------------------------------------------------------------------------------------


async def _stream(state: ServerState, req, batch: Batch, shell: dict, reply):
    """SSE chunks of a batch; `reply` makes a chat choice's `Reply` (None: plain completions)."""
    n, chat = batch.params.n, reply is not None
    streams: dict[int, TextStream] = {}
    replies: dict[int, Reply] = {}
    outputs: list[Output] = []
    pending = PendingTokens(state.stream_interval)
    try:
        async for events in batch.events():
            chunks: list[bytes] = []
            for event in events:
                if event[0] == "token":
                    pending.add(*event[1:])
                    continue
                chunks += _token_pieces(state, batch, shell, reply, streams, replies, pending)
                for o in event[2]:
                    index = event[1] * n + o.index
                    pending.drop(index)  # its last chunks complete its text from the output's
                    text = streams.setdefault(index, TextStream(state.engine.tokenizer, [])).finish(o.text)
                    pieces = (
                        _last_chat(state, req, o, index, replies, reply)
                        if chat
                        else [_last_text(req, state, o, index, text)]
                    )
                    chunks += [sse(shell | {"choices": [piece]}) for piece in pieces]
                    outputs.append(o)
            chunks += _token_pieces(state, batch, shell, reply, streams, replies, pending)
            if chunks:
                yield b"".join(chunks)  # a burst of tokens goes out in one write
    except ValueError as err:
        yield sse(error_body(str(err), "invalid_request_error", None, 400))
    except EngineGone as err:  # the stream ends with the reason, not a cut connection
        yield sse(error_body(str(err), "server_error", None, 503))
    if req.stream_options is not None and req.stream_options.include_usage and outputs:
        yield sse(shell | {"choices": [], "usage": _usage(outputs, n)})
    yield sse("[DONE]")


def _token_pieces(state: ServerState, batch: Batch, shell: dict, reply, streams: dict, replies: dict, pending):
    """The chunks of the choices with tokens due (`pending.due`), each choice's tokens decoded at once; a choice's
    first chunk opens it."""
    chunks = []
    for index, ids, logprobs in pending.due():
        if index not in streams:
            streams[index] = TextStream(state.engine.tokenizer, batch.params.stop)
            if reply is not None:  # OpenAI opens every chat choice with the role
                replies[index] = reply(index % batch.params.n)
                chunks.append(sse(shell | {"choices": [_delta(index, {"role": "assistant", "content": ""})]}))
        delta = streams[index].extend(ids, logprobs)
        if reply is not None:
            chunks += [sse(shell | {"choices": [_delta(index, d)]}) for d in replies[index].deltas(streams[index].text)]
        elif delta:
            chunks.append(sse(shell | {"choices": [_text_piece(index, delta)]}))
    return chunks


def _delta(index: int, delta: dict, **extra) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None} | extra


def _text_piece(index: int, text: str) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": None}


def _last_chat(state: ServerState, req, o: Output, index: int, replies: dict, reply) -> list[dict]:
    """What completes a chat choice: the deltas of its reply's rest, then its logprobs and finish reason."""
    pieces = []
    if index not in replies:  # no token came: still open the choice with the role
        replies[index] = reply(o.index)
        pieces.append(_delta(index, {"role": "assistant", "content": ""}))
    _, finish, deltas = replies[index].finish(o.text, _finish_reason(o))
    logprobs = _chat_logprobs(state, o) if req.logprobs else None
    return pieces + [_delta(index, d) for d in deltas] + [_delta(index, {}, logprobs=logprobs, finish_reason=finish)]


def _last_text(req, state: ServerState, o: Output, index: int, text: str) -> dict:
    logprobs = _completion_logprobs(state, o, req.logprobs) if req.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(o)}
