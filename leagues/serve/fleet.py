"""The fleet: engine replicas (`leagues serve` or SGLang servers) behind one `forward`, kept healthy.

    fleet = Fleet(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], FleetConfig())
    fleet.start()                           # periodic health checks (needs a running event loop)
    out = await fleet.generate({"input_ids": [...], "sampling_params": {...}, "session_id": "ep-7"})
    fleet.set_weight_version(3)             # the RL loop says which weights the fleet serves
    await fleet.close()

Where it sits: between rollout clients and the engine servers, which speak SGLang's native API (`POST
/generate`, `GET /health`, `GET /get_server_info`). `leagues router` is a thin HTTP layer over one
(`leagues.serve.router`); the RL loop holds one in-process for its external engines (`FleetClient`).

Decisions:
- Balancing: least outstanding requests (requests this fleet has in flight on a replica); ties go
  round-robin, so a sequential client still spreads its requests.
- Affinity: a request's key is its `session_id` (our extension field, removed before forwarding), else
  the part of its `rid` before the first `/` (`"episode-7/turn-2"` -> `episode-7`), else a hash of its
  prompt's first `affinity_prefix_len` tokens (or 4x that many characters of text). The key prefers the
  replica chosen for it last (an LRU table of `affinity_capacity` keys), so multi-turn sessions, the n
  requests of one GRPO group and prompts with a long shared prefix hit the replica whose prefix cache
  holds them, unless that replica has more than `affinity_max_imbalance` requests beyond the least busy
  healthy replica (bounded imbalance); then least-outstanding decides and the key moves.
- Health: every `health_interval` s, `GET /health` then `GET /get_server_info` (for `weight_version`).
  A failure is a failed check or a failed request (connection error, timeout, 5xx); `max_failures`
  consecutive failures quarantine a replica, and a quarantined replica gets no traffic. A success
  resets the count. A replica whose `/health` answers 503 says it is not ready (asleep, say):
  quarantined at once.
- Rejoin: a quarantined replica that answers its health checks again rejoins only when its weight
  version equals the fleet's: the version set by `set_weight_version` if any, else the highest version
  a healthy replica has reported (it never goes down by itself). So a replica restarted from an old
  checkpoint stays out until its weights are updated. With no version known yet, it rejoins at once.
  Version gating applies on rejoin only: a healthy replica behind the fleet (mid weight update) keeps
  serving; the RL loop owns update order and staleness.
- Retry: a request that fails with a connection error, timeout or 5xx is retried, up to `max_retries`
  times, on another healthy replica (one not tried yet if any). A 4xx is the request's fault: returned
  as-is, never retried. Retries resend the request whole (generation restarts; seeded requests
  give the same tokens on the same weights).
- No healthy replica: 503 with a message naming every replica and why it is out. The fleet's own
  errors take the engine server's shape, `{"error": {"message", "type", "param", "code"}}`; a request
  that failed on every replica tried gets the last 5xx as-is, or 502 after transport errors.
- Engines behind an API key: `api_key` is sent as a bearer token on every request and health check, to
  the engines the fleet was started with only: a URL added later gets neither the key nor, unless it is
  one of those, any secret (`add_engine(url, trusted=True)` trusts a new one).
- State lives on the `Fleet` and is only touched from its event loop, so it needs no locks; one
  `httpx.AsyncClient` (made on first use, closed by `close()`) serves every replica.
- Replicas given to the constructor start healthy (traffic flows before the first check); replicas added
  later (`add_engine`) start quarantined and join through a health check, version gate included.
- Weight updates (the RL loop's, between rollouts), in two calls around the caller's transport
  (`leagues.sync`): `weight_targets()` runs a fresh round of health checks and names the replicas that answer
  it, healthy or quarantined (a restarted engine: it gets the current weights before it serves), as
  `WeightTarget`s with their headers; `weights_updated(version, targets, failures)` then records the outcome.
  A replica whose update failed is quarantined and the others go on; so is a healthy replica that did not
  answer and so missed the update; only a fleet where none took the weights fails. The fleet then serves that
  version, so a replica that missed it stays out until it is updated, and a quarantined one that took it
  rejoins at once. Targets that do not serve the fleet's weights now are marked `rejoining`, so a transport
  with state per engine (a weight-update group) sets it up again for them.
- Not done: streaming (`"stream": true` is refused with 400).
"""

import asyncio
import contextlib
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import httpx

from leagues.types import WeightTarget

NO_STREAMING = "the fleet does not stream; send the request without `stream`"


@dataclass(kw_only=True, slots=True)
class FleetConfig:
    """Engine replicas behind one front: balancing, affinity, health checks and retries."""

    health_interval: float = 2.0
    """Seconds between two health checks of every replica."""
    health_timeout: float = 5.0
    """Seconds one health check (`/health`, then `/get_server_info`) may take before it counts as a failure."""
    connect_timeout: float = 5.0
    """Seconds to open a connection to a replica."""
    request_timeout: float = 600.0
    """Seconds a forwarded request may take; past it the attempt fails (and is retried elsewhere)."""
    max_failures: int = 3
    """Consecutive failures (health checks or requests) that quarantine a replica."""
    max_retries: int = 2
    """Retries of a request that failed with a connection error, timeout or 5xx (so at most 1 + this attempts)."""
    affinity_prefix_len: int = 256
    """Prompt tokens (4x as many characters for text prompts) hashed into a request's affinity key."""
    affinity_max_imbalance: int = 8
    """Affinity holds while its replica has at most this many more outstanding requests than the least busy one."""
    affinity_capacity: int = 65536
    """Affinity keys remembered (least recently used ones are forgotten)."""
    max_connections: int = 4096
    """Most open connections to all replicas together."""
    api_key: str = ""
    """Key sent to the engines the fleet was started with as `Authorization: Bearer <key>` (their `api_key`);
    engines added later get it only when added as trusted (never over HTTP). Empty: none (`leagues router` and
    `leagues train` then read $LEAGUES_API_KEY). A run's `config.yaml` never holds it."""

    def __post_init__(self) -> None:
        checks = {
            "health_interval": self.health_interval > 0,
            "health_timeout": self.health_timeout > 0,
            "connect_timeout": self.connect_timeout > 0,
            "request_timeout": self.request_timeout > 0,
            "max_failures": self.max_failures >= 1,
            "max_retries": self.max_retries >= 0,
            "affinity_prefix_len": self.affinity_prefix_len >= 1,
            "affinity_max_imbalance": self.affinity_max_imbalance >= 0,
            "affinity_capacity": self.affinity_capacity >= 0,
            "max_connections": self.max_connections >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"fleet.{name}: invalid value {getattr(self, name)!r}")


def engine_urls(engines: Sequence[str] | str) -> list[str]:
    """Normalised replica URLs: split a comma/space-separated string, add `http://`, drop a trailing `/`."""
    items = engines.replace(",", " ").split() if isinstance(engines, str) else list(engines)
    urls = [(u if "://" in u else f"http://{u}").rstrip("/") for u in items if u.strip()]
    if len(set(urls)) != len(urls):
        raise ValueError(f"engines: duplicate URL in {urls}")
    return urls


class ReplicaState(StrEnum):
    HEALTHY = "healthy"
    """Gets traffic."""
    QUARANTINED = "quarantined"
    """Failed `max_failures` times in a row, or answers with other weights than the fleet's: no traffic."""


@dataclass(slots=True)
class Replica:
    url: str
    state: ReplicaState = ReplicaState.HEALTHY
    trusted: bool = True
    """Gets the engines' API key (a replica the fleet was started with, or added as trusted)."""
    reason: str = ""
    """Why a quarantined replica is out (the last error, or its weight version against the fleet's)."""
    outstanding: int = 0
    """Requests this fleet has in flight on the replica."""
    failures: int = 0
    """Consecutive failed health checks and requests."""
    last_failure: str = ""
    """What went wrong the last time (kept while the replica is still healthy, too)."""
    weight_version: int | None = None
    """Last weight version the replica reported (health check or response); None until it does."""
    alive: bool = True
    """Its last health check answered (a quarantined replica that is alive gets weight updates, to rejoin)."""
    num_served: int = 0
    num_failed: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": str(self.state),
            "reason": self.reason,
            "outstanding": self.outstanding,
            "consecutive_failures": self.failures,
            "weight_version": self.weight_version,
            "num_served": self.num_served,
            "num_failed": self.num_failed,
        }


class FleetError(Exception):
    """A request the fleet could not serve: `status` is the HTTP status, `body` the JSON it answers."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class Answer(NamedTuple):
    """What `Fleet.forward` got: the HTTP status and JSON body, and how many replicas it tried."""

    status: int
    body: Any
    attempts: int


class _AttemptFailed(Exception):
    """One attempt on one replica failed in a retryable way (transport error, timeout, 5xx)."""

    def __init__(self, message: str, response: tuple[int, Any] | None = None) -> None:
        super().__init__(message)
        self.response = response


def _as_version(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def error_body(status: int, message: str, kind: str = "service_unavailable") -> dict[str, Any]:
    """The fleet's own errors, in the engine server's (OpenAI's) shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _message(response: httpx.Response) -> str:
    """The error message of an engine's answer (its `{"error": {"message"}}`), else its text, shortened."""
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message if message is not None else response.text)[:200]


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return error_body(response.status_code, response.text, "upstream_error")


class Fleet:
    """Engine replicas behind one `forward`; see the module docstring for the policies."""

    def __init__(self, urls: Sequence[str] | str, cfg: FleetConfig | None = None) -> None:
        self.cfg = cfg or FleetConfig()
        urls = engine_urls(urls)
        self.replicas: dict[str, Replica] = {url: Replica(url) for url in urls}
        self.configured = frozenset(urls)
        """The URLs the fleet was started with: they (and replicas added as trusted) get the engines' key."""
        self.target_version: int | None = None
        self.max_seen_version: int | None = None
        self.affinity: OrderedDict[str, str] = OrderedDict()
        self._turn = itertools.count()
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic health checks (call from inside the event loop that will use the fleet)."""
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="fleet-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> "Fleet":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(self.cfg.request_timeout, connect=self.cfg.connect_timeout)
            limits = httpx.Limits(max_connections=self.cfg.max_connections, max_keepalive_connections=256)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        return self._client

    # --- the replicas ---------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        """The fleet's version: the one set by `set_weight_version`, else the highest a healthy replica reported."""
        return self.target_version if self.target_version is not None else self.max_seen_version

    def set_weight_version(self, version: int | None) -> None:
        """The weights the fleet serves from now on (None: back to the highest version seen)."""
        self.target_version = version

    def add_engine(self, url: str, trusted: bool = False) -> Replica:
        """A new replica; it starts quarantined and joins after a health check at the fleet's version. It gets
        the engines' API key if it is one the fleet was started with, or `trusted`."""
        (url,) = engine_urls([url])
        if url in self.replicas:
            raise ValueError(f"engine {url} is already routed")
        trusted = trusted or url in self.configured
        replica = Replica(
            url, ReplicaState.QUARANTINED, trusted=trusted, reason="joining: not checked yet", alive=False
        )
        self.replicas[url] = replica
        return replica

    def headers(self, replica: Replica) -> dict[str, str] | None:
        """What every request to `replica` carries: the engines' key, if it is trusted with it."""
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key and replica.trusted else None

    def remove_engine(self, url: str) -> None:
        """Stop routing to `url`; its requests in flight finish (or fail and are retried elsewhere)."""
        (url,) = engine_urls([url])
        if self.replicas.pop(url, None) is None:
            raise ValueError(f"engine {url} is not routed (routed: {', '.join(self.replicas) or 'none'})")

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.HEALTHY]

    def info(self) -> dict[str, Any]:
        """The fleet view (`leagues router` serves it at `/get_server_info`)."""
        return {
            "router": True,
            "weight_version": self.weight_version,
            "num_replicas": len(self.replicas),
            "num_healthy": len(self.healthy()),
            "outstanding": sum(r.outstanding for r in self.replicas.values()),
            "replicas": [r.view() for r in self.replicas.values()],
        }

    # --- requests -------------------------------------------------------------------------------

    async def generate(self, payload: dict[str, Any]) -> Any:
        """`POST /generate` on a replica chosen by the policies; the replica's JSON, or `FleetError`."""
        answer = await self.forward("/generate", payload)
        if answer.status >= 400:
            raise FleetError(answer.status, answer.body)
        return answer.body

    async def forward(self, path: str, payload: dict[str, Any]) -> Answer:
        """POST `payload` to `path` of a chosen replica, retrying elsewhere; never raises for a replica's answer
        or failure."""
        if payload.get("stream"):
            return Answer(400, error_body(400, NO_STREAMING, "invalid_request"), 0)
        key = self.affinity_key(payload)
        body = {k: v for k, v in payload.items() if k != "session_id"}
        tried: list[str] = []
        failure: _AttemptFailed | None = None
        for _ in range(1 + self.cfg.max_retries):
            replica = self.choose(key, exclude=set(tried))
            if replica is None:
                break
            tried.append(replica.url)
            try:
                return Answer(*await self._attempt(replica, path, body), len(tried))
            except _AttemptFailed as err:
                failure = err
        if failure is None or not self.healthy():
            return Answer(503, error_body(503, self.unavailable_message()), len(tried))
        last = (502, error_body(502, f"{len(tried)} replicas tried, all failed; last: {failure}"))
        return Answer(*(failure.response or last), len(tried))

    async def _attempt(self, replica: Replica, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        replica.outstanding += 1
        try:
            response = await self.client.post(replica.url + path, json=body, headers=self.headers(replica))
        except httpx.TransportError as err:
            self._record_failure(replica, f"{type(err).__name__}: {err}".rstrip(": "))
            raise _AttemptFailed(f"{replica.url}: {type(err).__name__}: {err}") from err
        finally:
            replica.outstanding -= 1
        result = response.status_code, _json(response)
        if response.status_code >= 500:
            self._record_failure(replica, f"HTTP {response.status_code}")
            raise _AttemptFailed(f"{replica.url}: HTTP {response.status_code}", result)
        replica.failures = 0
        replica.num_served += 1
        self._note_version(replica, result[1])
        return result

    async def post_all(self, path: str, payload: dict[str, Any]) -> None:
        """POST `payload` to `path` of every healthy replica, best effort (an abort by request id: the replica
        serving it aborts it, the others know no such id)."""

        async def one(replica: Replica) -> None:
            with contextlib.suppress(httpx.HTTPError):
                await self.client.post(replica.url + path, json=payload, headers=self.headers(replica))

        await asyncio.gather(*(one(r) for r in self.healthy()))

    def _note_version(self, replica: Replica, body: Any) -> None:
        items = body if isinstance(body, list) else [body]  # a request with n > 1 answers a list
        meta = items[0].get("meta_info") if items and isinstance(items[0], dict) else None
        version = _as_version(meta.get("weight_version")) if isinstance(meta, dict) else None
        if version is not None:
            replica.weight_version = version
            self._saw_version(replica)

    def _saw_version(self, replica: Replica) -> None:
        version = replica.weight_version
        if replica.state is ReplicaState.HEALTHY and version is not None:
            self.max_seen_version = version if self.max_seen_version is None else max(self.max_seen_version, version)

    def _record_failure(self, replica: Replica, reason: str, at_once: bool = False) -> None:
        replica.failures += 1
        replica.num_failed += 1
        replica.last_failure = reason
        if (at_once or replica.failures >= self.cfg.max_failures) and replica.state is ReplicaState.HEALTHY:
            replica.state = ReplicaState.QUARANTINED
            replica.reason = reason if at_once else f"{replica.failures} consecutive failures; last: {reason}"
        elif replica.state is ReplicaState.QUARANTINED:
            replica.reason = reason if at_once else f"unreachable: {reason}"

    def unavailable_message(self) -> str:
        if not self.replicas:
            return "no healthy engine replica: the fleet has no replicas (add one with POST /add_engine)"
        out = "; ".join(f"{r.url} ({r.reason or r.state})" for r in self.replicas.values())
        return f"no healthy engine replica; fleet weight version {self.weight_version}; replicas: {out}"

    # --- weights --------------------------------------------------------------------------------

    async def weight_targets(self) -> list[WeightTarget]:
        """After a fresh round of health checks, the replicas that are to take the next weights: every one that
        answers (healthy, or quarantined and back, to rejoin), with its headers; `rejoining` when it does not
        serve the fleet's weights now."""
        await self.check_health()  # who answers now, at which weights
        fleet = self.weight_version
        return [
            WeightTarget(
                r.url,
                self.headers(r) or {},
                rejoining=r.state is ReplicaState.QUARANTINED or (fleet is not None and r.weight_version != fleet),
            )
            for r in self.replicas.values()
            if r.alive
        ]

    def weights_updated(
        self, version: int, targets: Sequence[WeightTarget], failures: Mapping[str, BaseException | str]
    ) -> dict[str, float]:
        """Record a weight update to `targets` (`failures`: those that did not take it, by URL): from now on the
        fleet serves `version`; a replica that failed, and a healthy one that was not a target, are quarantined;
        a quarantined target that took it rejoins. Raises `FleetError` (503) when no replica took the weights;
        else returns metrics (`fleet/...`)."""
        self.set_weight_version(version)
        sent = {t.url for t in targets}
        for replica in self.replicas.values():
            if replica.url not in sent:
                if replica.state is ReplicaState.HEALTHY:  # it did not answer its check: it must not serve old weights
                    reason = f"missed weight version {version}: its health check failed: {replica.last_failure}"
                    self._record_failure(replica, reason, at_once=True)
                continue
            if (error := failures.get(replica.url)) is not None:
                replica.alive = False
                self._record_failure(replica, f"weight update to version {version} failed: {error}", at_once=True)
                continue
            replica.weight_version, replica.failures = version, 0
            if replica.state is ReplicaState.QUARANTINED:
                self._maybe_rejoin(replica)
        updated = len(sent - set(failures))
        if not updated:
            message = f"no engine took weight version {version}: {self.unavailable_message()}"
            raise FleetError(503, error_body(503, message))
        return {
            "fleet/updated": float(updated),
            "fleet/healthy": float(len(self.healthy())),
            "fleet/replicas": float(len(self.replicas)),
        }

    # --- balancing and affinity -----------------------------------------------------------------

    def affinity_key(self, payload: dict[str, Any]) -> str | None:
        """`session_id`, else the `rid` part before `/`, else a hash of the prompt's first tokens."""
        if payload.get("session_id") is not None:
            return f"session:{payload['session_id']}"
        rid = payload.get("rid")
        if isinstance(rid, str) and "/" in rid:
            return f"session:{rid.split('/', 1)[0]}"
        prompt, k = payload.get("input_ids"), self.cfg.affinity_prefix_len
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:k]):
            data = ",".join(map(str, prompt[:k])).encode()
        elif isinstance(payload.get("text"), str) and payload["text"]:
            data = payload["text"][: 4 * k].encode()
        else:
            return None  # batched or missing prompts: balance only
        return "prefix:" + hashlib.blake2b(data, digest_size=8).hexdigest()

    def choose(self, key: str | None, exclude: set[str] = frozenset()) -> Replica | None:
        """The replica for a request: its affinity replica within the imbalance bound, else the least busy."""
        candidates = [r for r in self.healthy() if r.url not in exclude] or self.healthy()
        if not candidates:
            return None
        turn = next(self._turn) % len(candidates)
        least = min(candidates[turn:] + candidates[:turn], key=lambda r: r.outstanding)
        preferred = self.replicas.get(self.affinity.get(key)) if key is not None else None
        chosen = least
        if preferred in candidates and preferred.outstanding <= least.outstanding + self.cfg.affinity_max_imbalance:
            chosen = preferred
        self._remember(key, chosen.url)
        return chosen

    def _remember(self, key: str | None, url: str) -> None:
        if key is None or self.cfg.affinity_capacity == 0:
            return
        self.affinity[key] = url
        self.affinity.move_to_end(key)
        while len(self.affinity) > self.cfg.affinity_capacity:
            self.affinity.popitem(last=False)

    # --- health ---------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.cfg.health_interval)

    async def check_health(self) -> None:
        """One round of health checks over every replica (the periodic task calls this)."""
        replicas = list(self.replicas.values())
        results = await asyncio.gather(*(self._probe(r) for r in replicas))
        for replica, (version, error) in zip(replicas, results, strict=True):
            replica.alive = error is None
            if error is not None:
                self._record_failure(replica, error, at_once=error.startswith("not ready"))
                continue
            replica.failures = 0
            replica.weight_version = version
            self._saw_version(replica)
        # rejoin after every replica's version is noted, so a rejoin compares with the fleet's latest
        for replica, (_, error) in zip(replicas, results, strict=True):
            if error is None and replica.state is ReplicaState.QUARANTINED:
                self._maybe_rejoin(replica)

    async def _probe(self, replica: Replica) -> tuple[int | None, str | None]:
        """(weight version, None) for a replica that answers, else (None, what went wrong)."""
        timeout, headers = httpx.Timeout(self.cfg.health_timeout), self.headers(replica)
        try:
            health = await self.client.get(replica.url + "/health", timeout=timeout, headers=headers)
            if health.status_code == 503:
                return None, f"not ready: {_message(health)}"
            if health.status_code != 200:
                return None, f"/health answered HTTP {health.status_code}"
            info = await self.client.get(replica.url + "/get_server_info", timeout=timeout, headers=headers)
        except httpx.TransportError as err:
            return None, f"{type(err).__name__}: {err}".rstrip(": ")
        if info.status_code != 200:
            return None, f"/get_server_info answered HTTP {info.status_code}: {_message(info)}"
        body = _json(info)
        return _as_version(body.get("weight_version") if isinstance(body, dict) else None), None

    def _maybe_rejoin(self, replica: Replica) -> None:
        fleet = self.weight_version
        if fleet is not None and replica.weight_version != fleet:
            replica.reason = f"alive, but at weight version {replica.weight_version}; the fleet is at {fleet}"
            return
        replica.state, replica.reason = ReplicaState.HEALTHY, ""
        self._saw_version(replica)
