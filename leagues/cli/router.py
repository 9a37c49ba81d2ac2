"""`leagues router --engines URL[,URL ...] [--host H] [--port N]`: engine replicas behind one HTTP front.

The policies (least outstanding, affinity, health, quarantine, retries, version-gated rejoin) live in
`leagues.engine.router`; this file checks the URLs and runs the app under uvicorn until interrupted.

Decisions:
- `--engines` takes one value (dotted overrides take one value per key): comma- or space-separated
  URLs, or a YAML list (`--engines '[http://a:30000, http://b:30000]'`); a URL without a scheme gets
  `http://`.
- fastapi and uvicorn are imported when the verb runs, so `leagues --help` does not pay for them.
"""

from __future__ import annotations

import sys

from leagues.cli import UsageError
from leagues.engine.router import Router, RouterConfig, build_app, engine_urls


def run_router(cfg: RouterConfig) -> int:
    """The `leagues router` verb."""
    import uvicorn

    try:
        urls = engine_urls(cfg.engines)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not urls:
        raise UsageError("router needs engines: --engines http://host:port[,http://host:port ...]")
    app = build_app(Router(urls, cfg))
    print(f"leagues router: http://{cfg.host}:{cfg.port} -> {', '.join(urls)}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
