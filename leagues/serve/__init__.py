"""The HTTP front, apart from the engine core: `leagues serve`'s app (`server`) with SGLang-native, OpenAI and
admin routes (`api_*`), request bodies (`protocol`), Prometheus metrics (`metrics`), agent sessions
(`sessions`), the `fleet` of engine replicas (health, quarantine, retries, version-gated rejoin) and
`leagues router` (`router`, an HTTP layer over a fleet).

    from leagues.serve.server import create_app     # a FastAPI app over an `Engine`
    from leagues.serve.fleet import Fleet            # engine replicas behind one `forward`

The engine core (`leagues.engine`) never imports this package. Modules are imported by name, and this package
re-exports nothing, so importing it (or a module that needs no web framework) loads no FastAPI or uvicorn.
"""
