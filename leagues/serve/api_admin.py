"""SGLang's native control routes: health, model and server info, cache, abort, weights, memory, metrics.

    GET  /health                      200 while the engine's loop thread runs and the engine is awake, else
                                      503 (open without a key)
    GET  /health_generate             a 1-token generation (503 asleep, or if it fails or takes over
                                      `health_generate_timeout`, 20 s by default)
    GET  /get_model_info              model_path, is_generation, max_model_len, weight_version, ...
    GET  /get_server_info             weight_version (int), engine config, stats, served model, engine_pid (the
                                      engine's own process, or null when it shares the server's)
    POST /flush_cache                 drop the prefix cache                                             [admin]
    POST /abort_request               {"rid": ...} or {"abort_all": true} (abort_all: [admin])
    POST /update_weights_from_disk    {"model_path": dir, "weight_version"?}: safetensors in HF names,
                                      under the server's `weights_root` if it has one                   [admin]
    POST /release_memory_occupation   engine.sleep() (tags: kv_cache, weights)                          [admin]
    POST /resume_memory_occupation    engine.wake()                                                     [admin]
    POST /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group
                                      SGLang's NCCL/gloo weight protocol, in `remote_weights.py`        [admin]
    GET  /metrics                     Prometheus text format

Decisions:
- Admin work ([admin] above) lives on the `admin` router, whose every route first runs `require_admin`, the
  one admin check (also called by `/abort_request` for `abort_all`): the caller the auth middleware found must
  hold the admin key when the server has one (403 for the API key, 401 for none or another).
- Blocking engine calls (`load_weights`, `sleep`, `flush_cache`) run in a worker thread, so the event
  loop keeps serving while the engine thread does them between steps.
- `update_weights_from_disk` checks the checkpoint against the model before writing anything
  (`leagues.engine.disk_weights`): a wrong directory fails with 400 and leaves the served weights untouched.
  The tensors are then read lazily, one at a time, on the engine thread.
- `init_weights_update_group` joins one group at a time (409 while another join waits) and waits at most
  `weight_group_timeout` (300 s by default) for it to form: a join holds a worker thread, and the
  threads are few.
- The distributed routes take a plain JSON object and leave parsing to `remote_weights.py` (its errors,
  `ValueError`s naming the field, are 400 with `{"success": false, "message"}`); they run beside the engine
  (in its process, when it has one), where the weight groups are kept.
- There is no `update_weights_from_tensor`: SGLang's version unpickles tensors sent over HTTP, which
  would let any caller run code in the server. Weights arrive from disk or over NCCL.
"""

import asyncio
import os
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response

from leagues.serve.api_common import ASK_FOR_KEY, UNAUTHORIZED, APIError, Caller, ServerState, error_response, state_of
from leagues.serve.protocol import AbortRequest, MemoryRequest, UpdateWeightsFromDiskRequest
from leagues.types import SamplingParams

ASLEEP = "the engine is asleep (memory released): not ready"


def require_admin(request: Request, param: str | None = None) -> None:
    """Refuse a caller without the admin key, if the server has one: 403 for the API key, 401 for none or another
    (`param`: the option that needs it, when the route itself does not)."""
    caller = request.scope.get("leagues_caller", Caller.ADMIN)  # an app without the auth middleware: open
    if caller is Caller.USER:
        needs = f"{param}: needs the admin key" if param else "this endpoint needs the admin key"
        raise APIError(403, needs, param=param, kind="permission_error")
    if caller is not Caller.ADMIN:
        raise APIError(401, UNAUTHORIZED, param=param, kind="authentication_error", headers=ASK_FOR_KEY)


router = APIRouter(tags=["admin"])
admin = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])
"""The admin routes: each refuses a caller without the admin key before it looks at its body's fields."""


@router.get("/health")
async def health(request: Request):
    status = state_of(request).engine.status()
    if not status.alive:
        return error_response(503, "the engine loop is not running", "server_error")
    if status.asleep:
        return error_response(503, ASLEEP, "server_error")
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request):
    state = state_of(request)
    if state.engine.asleep:
        return error_response(503, ASLEEP, "server_error")
    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    rid, timeout = state.new_id("health"), state.limits.health_generate_timeout
    try:
        await asyncio.wait_for(state.engine.generate_async([0], params, rid), timeout)
    except (TimeoutError, RuntimeError) as err:
        return error_response(503, f"generation failed: {str(err) or f'no token within {timeout:g} s'}", "server_error")
    finally:
        state.engine.abort(rid)  # a no-op once it finished; else it would run on with nobody waiting
    return Response(status_code=200)


@router.get("/get_model_info")
async def get_model_info(request: Request):
    state = state_of(request)
    engine = state.engine
    return {
        "model_path": state.model_path,
        "tokenizer_path": state.model_path if engine.tokenizer is not None else None,
        "served_model_name": state.served_model_name,
        "is_generation": True,
        "architecture": engine.family,
        "max_model_len": engine.max_model_len,
        "weight_version": engine.weight_version,
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }


@router.get("/get_server_info")
async def get_server_info(request: Request):
    state = state_of(request)
    engine = state.engine
    status = await asyncio.to_thread(engine.fresh_status)
    return {
        "model_path": state.model_path,
        "served_model_name": state.served_model_name,
        "weight_version": status.weight_version,
        "engine_config": asdict(engine.config),
        "max_model_len": engine.max_model_len,
        "num_blocks": status.num_blocks,
        "asleep": status.asleep,
        "stats": status.stats,
        "num_waiting": status.num_waiting,
        "num_running": status.num_running,
        "num_in_flight_requests": len(state.in_flight),  # this front's (the engine's queues: the two above)
        "engine_pid": engine.pid,
        "fronts": state.fronts,
        "front_pid": os.getpid(),
        "version": request.app.version,
    }


@admin.post("/flush_cache")
async def flush_cache(request: Request):
    await asyncio.to_thread(state_of(request).engine.flush_cache)
    return {"success": True, "message": "prefix cache flushed"}


@router.post("/abort_request")
async def abort_request(req: AbortRequest, request: Request):
    state = state_of(request)
    if not req.rid and not req.abort_all:
        raise APIError(422, "rid: give a request id, or abort_all: true", param="rid")
    if req.abort_all:  # every request the engine holds: every front's, where it serves several
        require_admin(request, param="abort_all")
        count = await asyncio.to_thread(state.engine.abort_all)
    else:
        state.engine.abort(req.rid)
        count = 1
    return {"success": True, "message": f"aborted {count} request(s)"}


@admin.post("/update_weights_from_disk")
async def update_weights_from_disk(req: UpdateWeightsFromDiskRequest, request: Request):
    state = state_of(request)
    engine = state.engine
    root = state.weights_root
    if root is not None and not Path(req.model_path).resolve().is_relative_to(root.resolve()):
        message = f"model_path: {req.model_path} is outside the server's weights root {root}"
        raise APIError(403, message, param="model_path", kind="permission_error")
    path, version, abort_all = Path(req.model_path), req.weight_version, req.abort_all_requests
    try:  # the checkpoint is checked against the model before anything is aborted or written
        count = await asyncio.to_thread(engine.load_from_disk, path, version, abort_all)
    except (ValueError, OSError) as err:
        return JSONResponse({"success": False, "message": str(err)}, status_code=400)
    state.model_path = req.model_path
    message = f"loaded {count} tensors from {req.model_path}; weight version {engine.weight_version}"
    return {"success": True, "message": message, "weight_version": engine.weight_version, "num_paused_requests": 0}


@admin.post("/release_memory_occupation")
async def release_memory_occupation(request: Request, req: MemoryRequest | None = None):
    tags = (req.tags if req else None) or ["kv_cache", "weights"]
    await asyncio.to_thread(state_of(request).engine.sleep, "weights" in tags)
    return {"success": True, "message": f"released {', '.join(tags)}"}


@admin.post("/resume_memory_occupation")
async def resume_memory_occupation(request: Request, req: MemoryRequest | None = None):
    await asyncio.to_thread(state_of(request).engine.wake)
    return {"success": True, "message": "resumed"}


@admin.post("/init_weights_update_group")
async def init_weights_update_group(request: Request, req: dict = Body(...)):  # noqa: B008
    state = state_of(request)
    if state.joining:  # each join holds a worker thread until its group forms (or the timeout)
        raise APIError(409, "group_name: another weight-group join is under way", param="group_name")
    state.joining = True
    try:
        return await _remote(request, "init_weights_update_group", req)
    finally:
        state.joining = False


@admin.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request, req: dict = Body(...)):  # noqa: B008
    return await _remote(request, "update_weights_from_distributed", req)


@admin.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request, req: dict = Body(...)):  # noqa: B008
    return await _remote(request, "destroy_weights_update_group", req)


async def _remote(request: Request, route: str, req: dict):
    """One of `remote_weights`' routes, run beside the engine off the event loop (joining a group and broadcasts
    block)."""
    state = state_of(request)
    try:
        return await asyncio.to_thread(state.engine.weight_group, route, req, state.limits.weight_group_timeout)
    except ValueError as err:
        return JSONResponse({"success": False, "message": str(err)}, status_code=400)


@router.get("/metrics")
async def metrics(request: Request):
    state: ServerState = state_of(request)
    state.metrics.refresh(await asyncio.to_thread(state.engine.fresh_status))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
