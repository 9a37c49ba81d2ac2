"""`leagues router --engines URL[,URL ...] [--host H] [--port N]`: engine replicas behind one HTTP front.

The policies (least outstanding, affinity, health, quarantine, retries, version-gated rejoin) are the
fleet's (`leagues.serve.fleet`, tuned with `--fleet.*`) and the HTTP layer is `leagues.serve.router`; this
file checks the URLs and runs the app under uvicorn until interrupted.

Decisions:
- `--engines` takes one value (dotted overrides take one value per key): comma- or space-separated
  URLs, or a YAML list (`--engines '[http://a:30000, http://b:30000]'`); a URL without a scheme gets
  `http://`.
- fastapi and uvicorn are imported when the verb runs, so `leagues --help` does not pay for them.
- Binding beyond loopback needs `--client_api_key` and `--admin_key` (else `--insecure`), as `leagues
  serve` needs its keys: the router forwards prompts and holds the engines' key. Keys may come from
  `LEAGUES_ROUTER_API_KEY` / `LEAGUES_ROUTER_ADMIN_KEY` / `LEAGUES_API_KEY` (the engines' key) too.
"""

from __future__ import annotations

import os
import sys

from leagues.cli import LOOPBACK, UsageError
from leagues.serve.fleet import Fleet, engine_urls
from leagues.serve.router import RouterConfig, build_app


def run_router(cfg: RouterConfig) -> int:
    """The `leagues router` verb."""
    import uvicorn

    try:
        urls = engine_urls(cfg.engines)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not urls:
        raise UsageError("router needs engines: --engines http://host:port[,http://host:port ...]")
    cfg.fleet.api_key = cfg.fleet.api_key or os.environ.get("LEAGUES_API_KEY", "")
    cfg.client_api_key = cfg.client_api_key or os.environ.get("LEAGUES_ROUTER_API_KEY", "")
    cfg.admin_key = cfg.admin_key or os.environ.get("LEAGUES_ROUTER_ADMIN_KEY", "")
    missing = [f"--{n}" for n in ("client_api_key", "admin_key") if not getattr(cfg, n)]
    if cfg.host not in LOOPBACK and missing and not cfg.insecure:
        raise UsageError(
            f"host {cfg.host} is not loopback and {' and '.join(missing)} unset: anyone who reaches the port"
            " could send prompts through the engines' key, or point the router elsewhere; set them, or pass"
            " --insecure on a trusted network"
        )
    app = build_app(Fleet(urls, cfg.fleet), cfg)
    print(f"leagues router: http://{cfg.host}:{cfg.port} -> {', '.join(urls)}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
