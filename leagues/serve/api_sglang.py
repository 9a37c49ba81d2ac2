"""`POST /generate`: SGLang's native generation API, as slime and other RL frameworks call it.

Request (`protocol.GenerateRequest`): `text` or `input_ids` (one prompt, or a batch as a list),
`sampling_params` (temperature, top_p, top_k, min_p, max_new_tokens, stop, stop_token_ids, ignore_eos,
n, seed), `return_logprob`, `top_logprobs_num`, `stream`, `rid`, `return_routed_experts`.

Response, one object per output (a flat list, prompt-major, for a batch or n > 1):

    {"text": str, "output_ids": [int],
     "meta_info": {"id": rid, "finish_reason": {...}, "prompt_tokens", "completion_tokens", "cached_tokens",
                   "weight_version": int, "first_weight_version": int, "e2e_latency": float,
                   "output_token_logprobs": [[logprob, token_id, text|null], ...],     # return_logprob
                   "output_top_logprobs": [[[logprob, token_id, text|null], ...], ...],  # top_logprobs_num > 0
                   "routed_experts": base64, "routed_experts_shape": [T, L, K]}}       # return_routed_experts

Decisions:
- `finish_reason` is shaped as SGLang shapes it: `{"type": "length", "length": completion_tokens}`,
  `{"type": "stop", "matched": token_id}` for an eos or stop token, `{"type": "stop", "matched": "str"}`
  for a stop string, `{"type": "abort", "message": ...}`.
- Logprobs are the engine's: each sampled token under softmax(logits / temperature) before truncation
  (temperature 1 when greedy). The third element of an entry is the token's text only with
  `return_text_in_logprobs`, as in SGLang. Prompt logprobs (`input_token_logprobs`) are not computed.
- `routed_experts` is SGLang's encoding: base64 of the int32 (little-endian) array [T, L, K], flattened,
  where T = prompt + completion tokens - 1 (every token the model computed), L the MoE layers, K top-k.
  Decode: `np.frombuffer(base64.b64decode(s), np.int32).reshape(shape)`. `routed_experts_shape` is ours, and so
  is `routed_experts_start` (the rows from that token on: a multi-turn client fetches each turn's new rows).
- `weight_version` is an int (SGLang's is a string): the router compares them.
- Streaming sends, per output, chunks with the cumulative `text` and `output_ids` so far (SGLang's
  default, non-incremental mode) and `"index"`, then the complete final object, then `data: [DONE]`.
  A chunk follows each burst of tokens the event loop takes at once (one token a chunk while the client
  keeps up, several when the stream falls behind the engine); a burst's chunks go out in one write.
"""

import base64
import json
import time

import torch
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
from leagues.serve.protocol import GenerateRequest
from leagues.serve.reply import TextStream, sse
from leagues.types import FinishReason

router = APIRouter(tags=["sglang"])


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request):
    state = state_of(request)
    prompts, is_batch = _prompts(req)
    field = "text" if req.text is not None else "input_ids"
    params = req.sampling_params.to_params(
        top_logprobs=req.top_logprobs_num,
        return_routed_experts=req.return_routed_experts,
        routed_experts_start=req.routed_experts_start,
    )
    ids = await off_loop_if_large(request, admit, state, prompts, params, field)
    batch = Batch(state, ids, params, _rids(state, req.rid, len(prompts), is_batch), stream=req.stream, field=field)
    if req.stream:
        return StreamingResponse(_stream(state, req, batch), media_type="text/event-stream")
    outputs = await batch.results()
    bodies = [response_of(state, req, o, batch) for o in outputs]
    return bodies if is_batch or params.n > 1 else bodies[0]


def _prompts(req: GenerateRequest) -> tuple[list, bool]:
    if (req.text is None) == (req.input_ids is None):
        raise APIError(422, "give exactly one of `text` and `input_ids`", param="text")
    if req.text is not None:
        prompts, is_batch = ([req.text], False) if isinstance(req.text, str) else (req.text, True)
        param = "text"
    else:
        ids = req.input_ids
        prompts, is_batch = (ids, True) if ids and isinstance(ids[0], list) else ([ids], False)
        param = "input_ids"
    if not prompts:
        raise APIError(422, f"{param}: the batch is empty", param=param)
    return prompts, is_batch


def _rids(state: ServerState, rid: str | list[str] | None, num: int, is_batch: bool) -> list[str]:
    if rid is None:
        base = state.new_id("gen")
        return [f"{base}-{i}" for i in range(num)] if is_batch else [base]
    if isinstance(rid, str):
        return [f"{rid}-{i}" for i in range(num)] if is_batch else [rid]
    if len(rid) != num or len(set(rid)) != num:
        raise APIError(400, f"rid: {len(rid)} ids for {num} prompts (they must be distinct)", param="rid")
    return list(rid)


def finish_reason_of(state: ServerState, o: Output, stop: list[str]) -> dict:
    """SGLang's `finish_reason` object."""
    if o.finish_reason == FinishReason.LENGTH:
        return {"type": "length", "length": len(o.token_ids)}
    if o.finish_reason == FinishReason.ABORT:
        return {"type": "abort", "message": "the request was aborted"}
    last = o.token_ids[-1] if o.token_ids else None
    if not stop or state.engine.tokenizer is None:
        return {"type": "stop", "matched": last}
    full = state.engine.tokenizer.decode(o.token_ids, skip_special_tokens=True)
    matched = next((s for s in stop if full.startswith(s, len(o.text))), None)  # else an eos or stop token
    return {"type": "stop", "matched": matched if matched is not None else last}


def _token_text(state: ServerState, token_id: int, with_text: bool) -> str | None:
    tok = state.engine.tokenizer
    return tok.decode([token_id]) if with_text and tok is not None else None


def encode_routes(routes: torch.Tensor) -> tuple[str, list[int]]:
    """SGLang's wire format: base64 of the int32 array, flattened; plus its shape."""
    data = routes.to(torch.int32).contiguous().numpy().astype("<i4").tobytes()
    return base64.b64encode(data).decode("ascii"), list(routes.shape)


def response_of(state: ServerState, req: GenerateRequest, o: Output, batch: Batch) -> dict:
    meta = {
        "id": o.request_id,
        "finish_reason": finish_reason_of(state, o, batch.params.stop),
        "prompt_tokens": len(o.prompt_token_ids),
        "completion_tokens": len(o.token_ids),
        "cached_tokens": o.num_cached_tokens,
        "weight_version": o.weight_version,
        "first_weight_version": o.first_weight_version,
        "e2e_latency": time.monotonic() - batch.start,
    }
    with_text = req.return_text_in_logprobs
    if req.return_logprob:
        meta["output_token_logprobs"] = [
            [finite(lp), t, _token_text(state, t, with_text)] for lp, t in zip(o.logprobs, o.token_ids, strict=True)
        ]
    if req.top_logprobs_num > 0:
        meta["output_top_logprobs"] = [
            [[finite(lp), t, _token_text(state, t, with_text)] for t, lp in position] for position in o.top_logprobs
        ]
    if req.return_routed_experts and o.routed_experts is not None:
        meta["routed_experts"], meta["routed_experts_shape"] = encode_routes(o.routed_experts)
    return {"text": o.text, "output_ids": o.token_ids, "meta_info": meta}


async def _stream(state: ServerState, req: GenerateRequest, batch: Batch):
    n = batch.params.n
    streams: dict[int, TextStream] = {}
    try:
        pending = PendingTokens(state.stream_interval)
        async for events in batch.events():
            chunks = []
            for event in events:
                if event[0] == "token":
                    pending.add(*event[1:])
                    continue
                chunks += _partials(state, req, batch, streams, pending)
                for o in event[2]:
                    pending.drop(event[1] * n + o.index)  # its last chunk holds every token
                    body = response_of(state, req, o, batch)
                    chunks.append(sse(body | {"index": event[1] * n + o.index}))
            chunks += _partials(state, req, batch, streams, pending)
            if chunks:
                yield b"".join(chunks)
    except ValueError as err:
        yield sse(error_body(str(err), "invalid_request_error", None, 400))
    except EngineGone as err:  # the stream ends with the reason, not a cut connection
        yield sse(error_body(str(err), "server_error", None, 503))
    yield sse("[DONE]")


def _partials(state: ServerState, req: GenerateRequest, batch: Batch, streams: dict, pending: PendingTokens):
    """One chunk for each output with tokens due (`pending.due`), its tokens decoded at once."""
    chunks = []
    for index, ids, logprobs in pending.due():
        text = streams.get(index)
        if text is None:
            text = streams[index] = TextStream(state.engine.tokenizer, batch.params.stop)
        text.extend(ids, logprobs)
        chunks.append(_partial(req, batch, index, text))
    return chunks


def _partial(req: GenerateRequest, batch: Batch, index: int, text: TextStream) -> bytes:
    """The chunk of a sample still running: its text and ids so far (SGLang repeats them every chunk)."""
    rid = batch.rids[index // batch.params.n]
    if req.return_logprob:
        meta = {"id": rid, "finish_reason": None, "completion_tokens": len(text.ids)}
        meta["output_token_logprobs"] = [[finite(lp), t, None] for lp, t in zip(text.logprobs, text.ids, strict=True)]
        return sse({"text": text.text, "output_ids": list(text.ids), "meta_info": meta, "index": index})
    # json.dumps of the same dict, written out: the ids' JSON grown token by token instead of encoded whole every
    # chunk, and no meta dict to build and walk
    meta = f'{{"id": {json.dumps(rid)}, "finish_reason": null, "completion_tokens": {len(text.ids)}}}'
    body = f'{{"text": {json.dumps(text.text)}, "output_ids": {text.ids_json()}, "meta_info": {meta}'
    return f'data: {body}, "index": {index}}}\n\n'.encode()
