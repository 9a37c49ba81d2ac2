"""`leagues router`: one HTTP front for an engine fleet (`leagues serve` or SGLang servers).

    app = build_app(Fleet(urls, cfg.fleet), cfg)   # a FastAPI app; `leagues router` runs it with uvicorn

Where it sits: clients that cannot hold a fleet in-process (other jobs, other languages) reach the engines
through it; every policy (balancing, affinity, health, quarantine, retries, version-gated rejoin) is the
fleet's (`leagues.serve.fleet`), so this file is only the HTTP layer: SGLang's `/generate`, `/health` and
`/get_server_info` (the fleet view), plus `POST /add_engine` / `/remove_engine`.

Decisions:
- The router authenticates its clients: with `client_api_key`, every route but `/health` needs it (401);
  `/add_engine` and `/remove_engine` need `admin_key` (403 with any other key, and always refused on a
  router without one), since they choose where users' prompts go. Keys are compared in constant time.
- A URL added over HTTP gets neither the engines' key nor, unless it is one the router was started with,
  any secret (the fleet's trust rule).
- Bodies are read only past the key check, and at most `max_request_bytes` of them (413 beyond).
- The router's own errors take the engine server's shape, `{"error": {"message", "type", "param", "code"}}`.
- Health checks run while the app is up (its lifespan starts and closes the fleet).
"""

import contextlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from leagues.serve.fleet import Fleet, FleetConfig, error_body


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    """`leagues router`: the engines, the address it listens on, its clients' keys, and the fleet's policies."""

    engines: list[str] | str = field(default_factory=list)
    """URLs of the engine servers: a YAML list, or one string of comma- or space-separated URLs
    (`--engines http://a:30000,http://b:30000`)."""
    host: str = "127.0.0.1"
    """Address `leagues router` listens on."""
    port: int = 30010
    """Port `leagues router` listens on."""
    client_api_key: str = ""
    """Key `leagues router`'s clients must send (`Authorization: Bearer <key>`) on every route but /health
    (401 otherwise); empty: none asked (`leagues router` then reads $LEAGUES_ROUTER_API_KEY)."""
    admin_key: str = ""
    """Key `/add_engine` and `/remove_engine` need (403 for any other key; without one they are refused); it
    also opens every other route (`leagues router` reads $LEAGUES_ROUTER_ADMIN_KEY when it is empty)."""
    max_request_bytes: int = 32 * 2**20
    """Largest request body the router reads (larger ones get 413, counted as they arrive), as an engine server's
    `limits.max_request_bytes`."""
    insecure: bool = False
    """Allow `leagues router` to bind beyond loopback without both client keys (a network where every peer
    is trusted)."""
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """Balancing, affinity, health checks, retries, and the engines' key (`--fleet.api_key`)."""

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be positive, got {self.max_request_bytes}")


FLEET_PATHS = frozenset({"/add_engine", "/remove_engine"})


class _ClientAuth:
    """ASGI: every route but /health needs the client key (401), the fleet routes the admin key (403)."""

    def __init__(self, app, client_key: str, admin_key: str) -> None:
        self.app, self.client_key, self.admin_key = app, client_key, admin_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        token = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        scheme, _, token = (token or "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        admin = bool(self.admin_key) and hmac.compare_digest(token.encode(), self.admin_key.encode())
        client = admin or not self.client_key or hmac.compare_digest(token.encode(), self.client_key.encode())
        if scope["path"] in FLEET_PATHS and not admin:
            if not token and self.client_key:
                return await _refuse(send, 401, "missing API key (Authorization: Bearer ...)")
            why = "needs the admin key" if self.admin_key else "is refused: the router has no admin key"
            return await _refuse(send, 403, f"changing the fleet {why}", "permission_error")
        if not client:
            return await _refuse(send, 401, "missing or wrong API key (Authorization: Bearer ...)")
        return await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str, kind: str = "authentication_error") -> None:
    body = json.dumps(error_body(status, message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(fleet: Fleet, cfg: RouterConfig):
    """A FastAPI app over `fleet`: SGLang's `/generate`, `/health`, `/get_server_info`, plus `/add_engine` and
    `/remove_engine` (`{"url": ...}`), behind `cfg`'s client and admin keys. Health checks run while the app
    is up."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        fleet.start()
        yield
        await fleet.close()

    app = FastAPI(title="leagues router", lifespan=lifespan)
    app.add_middleware(_ClientAuth, client_key=cfg.client_api_key, admin_key=cfg.admin_key)

    async def body_of(request: Request) -> dict[str, Any] | JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_request_bytes:
                message = f"request body is larger than {cfg.max_request_bytes} bytes"
                return JSONResponse(error_body(413, message, "invalid_request"), status_code=413)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse(error_body(400, "the request body is not JSON", "invalid_request"), status_code=400)
        if not isinstance(payload, dict):
            message = "the request body must be a JSON object"
            return JSONResponse(error_body(400, message, "invalid_request"), status_code=400)
        return payload

    @app.post("/generate")
    async def generate(request: Request):
        payload = await body_of(request)
        if isinstance(payload, JSONResponse):
            return payload
        answer = await fleet.forward("/generate", payload)
        return JSONResponse(answer.body, status_code=answer.status)

    @app.get("/health")
    async def health():
        if fleet.healthy():
            return JSONResponse({"status": "ok", "num_healthy": len(fleet.healthy())})
        return JSONResponse(error_body(503, fleet.unavailable_message()), status_code=503)

    @app.get("/get_server_info")
    async def server_info():
        return fleet.info()

    @app.post("/add_engine")
    async def add_engine(request: Request):
        return await _change_fleet(fleet, await body_of(request), add=True)

    @app.post("/remove_engine")
    async def remove_engine(request: Request):
        return await _change_fleet(fleet, await body_of(request), add=False)

    return app


async def _change_fleet(fleet: Fleet, payload: Any, add: bool):
    from fastapi.responses import JSONResponse

    if not isinstance(payload, dict):
        return payload  # the JSONResponse of a bad body
    if not isinstance(payload.get("url"), str):
        return JSONResponse(error_body(400, 'expected {"url": "http://host:port"}', "invalid_request"), status_code=400)
    try:
        if add:
            fleet.add_engine(payload["url"])
            await fleet.check_health()  # join now if it can, rather than at the next round
        else:
            fleet.remove_engine(payload["url"])
    except ValueError as err:
        return JSONResponse(error_body(400, str(err), "invalid_request"), status_code=400)
    return fleet.info()
