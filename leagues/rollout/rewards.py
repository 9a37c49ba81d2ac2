"""Reward scoring: a registry of reward functions, user rewards by import spec, a remote reward model, and
the scorer that runs them over a batch of samples without letting one bad sample stop the step.

Where it sits: after generation, before advantages. The loop builds one `RewardScorer(cfg)` per run and
calls `await scorer.score(samples)` (or `scorer.score_sync(samples)`) each step; every sample carries its
inputs in `metadata["prompt_text"]`, `["response_text"]` and `["label"]`, and gets `sample.reward` set.

    REWARDS    exact, math, countdown, format (verifiers.py), remote, env   RewardConfig -> reward function
    user       "pkg.module:function" or "path/to/file.py:function"

A per-sample reward is `fn(prompt, response, label, metadata) -> float`; a group reward (`group=True`) is
`fn(prompts, responses, labels, metadatas) -> list[float]`, called once per prompt group (`sample.group_id`),
e.g. for rewards relative to the other answers. Either may be `async def`. Arguments are bound by parameter
name: a function may take any of `prompt`, `response`, `label`, `metadata`, `sample` (the `Sample` itself), in
any order (`def r(response, label)`); a group function the plural names (`prompts`, ..., `samples`). A function
whose parameters have other names gets the four inputs by position, as before, when it takes exactly four.
`reward_kwargs` are passed to user functions as keyword arguments, and configure the built-ins that take any
(`format`: `pattern`, `match`).

Decisions:
- Failures are contained: an exception, a timeout (`timeout_s` per call), or a return that is not a finite
  number marks the sample (every sample of the group, for a failed group call) FAILED with reward 0.0 and
  `metadata["error"]` = "reward: <type>: <message>", and is counted in `RewardStats`. `strict=True` turns
  the first failure (lowest sample index) into a `RewardError` after the batch is done. Samples already
  FAILED (by generation) are skipped and keep their error.
- Everything runs concurrently on one event loop, at most `max_concurrency` calls at a time. A sync function
  runs on a daemon thread (kept for later calls once its call returns): a timed-out thread cannot be killed, and
  a standard pool's (or the loop's default executor's) worker threads are joined at interpreter exit, so one
  reward that never returns would keep the process alive after the run. The abandoned call runs on in the
  background, holding its thread, until it returns or the process exits; the next call starts another thread.
- The reward function is resolved once, when the scorer is built: a bad name, module, file or attribute,
  or a signature it cannot be called with, raises `ValueError` naming the spec (and the function's file and
  line) before any rollout.
- A batch in which the reward failed on every sample is a broken reward, not a reward of 0:
  `RewardStats.raise_if_none_scored` raises `RewardError` with the first failure, and the rollout and
  `leagues eval` call it after scoring. A `.py` file is imported under a name derived
  from its absolute path and cached in `sys.modules`, so it is executed once per process.
- Remote reward model: POST of `{"prompt", "response", "label", "metadata"}` as JSON (values JSON cannot
  encode are sent as their `str`), answer a number or `{"reward": number}`. Connection errors and 5xx are
  retried `remote_retries` times with a short exponential backoff, all within the call's `timeout_s`; a
  4xx is the request's fault and is not retried. One `httpx.AsyncClient` (connection pool) serves a
  `score` call; it is opened and closed inside the call so it never outlives its event loop.
"""

import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from leagues.rollout.verifiers import countdown_reward, exact_reward, make_format_reward, math_reward
from leagues.types import Sample, SampleStatus

RewardFn = Callable[..., Any]
"""`fn(prompt, response, label, metadata) -> float` or, for groups, `fn(prompts, responses, labels, metadatas)
-> list[float]`; sync or async."""


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    SHORTHAND: ClassVar[str] = "name"
    """`--reward NAME` sets `reward.name`."""

    name: str = "exact"
    """A key of REWARDS (exact, math, countdown, format, remote, env: a multi-turn env's own), 'pkg.module:function'
    (importable from sys.path) or 'path/to/file.py:function' (relative to the working directory)."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward: `pattern` and `match` for format; passed on to user functions."""
    group: bool = False
    """The user function scores a whole prompt group at once: fn(prompts, responses, labels, metadatas)."""
    url: str | None = None
    """Endpoint of the remote reward model (name 'remote' only)."""
    timeout_s: float = 30.0
    """Time limit of one reward call (one sample, or one group), retries included; over it the sample fails."""
    max_concurrency: int = 64
    """Reward calls in flight at once."""
    strict: bool = False
    """Raise RewardError on the first failed sample instead of marking it FAILED with reward 0."""
    remote_retries: int = 2
    """Retries of a remote call after a connection error or a 5xx answer."""

    def __post_init__(self) -> None:
        if self.name not in REWARDS and ":" not in self.name:
            raise ValueError(
                f"RewardConfig.name: unknown reward {self.name!r}; expected one of {', '.join(REWARDS)}, "
                "'pkg.module:function' or 'path/to/file.py:function'"
            )
        checks = {
            "group": not (self.group and self.name in REWARDS),  # built-ins score one sample at a time
            "url": (self.url is not None) == (self.name == "remote"),
            "timeout_s": self.timeout_s > 0,
            "max_concurrency": self.max_concurrency >= 1,
            "remote_retries": self.remote_retries >= 0,
        }
        hints = {"group": "only user functions score groups", "url": "a url is needed by, and only by, 'remote'"}
        for key, ok in checks.items():
            if not ok:
                value = getattr(self, key)
                raise ValueError(f"RewardConfig.{key}: invalid value {value!r} ({hints.get(key, 'out of range')})")


class RewardError(RuntimeError):
    """A reward failed while `strict` is on."""


@dataclass(slots=True)
class RewardStats:
    """What one `score` call did."""

    scored: int = 0
    """Samples that got a reward."""
    failed: int = 0
    """Samples marked FAILED by the reward (timed-out ones included)."""
    timed_out: int = 0
    """Of the failed samples, those whose reward call ran over `timeout_s`."""
    skipped: int = 0
    """Samples already FAILED before scoring, left as they were."""
    first_error: str = field(default="", compare=False)
    """The first failure (lowest sample index): "sample I: <type>: <message> (at FILE:LINE)"."""

    def raise_if_none_scored(self, name: str) -> None:
        """Raise `RewardError` when the reward failed on every sample it was given."""
        if self.failed and not self.scored:
            raise RewardError(
                f"reward {name!r} failed on all {self.failed} samples of a batch (a reward that always fails is "
                f"broken, not a reward of 0); first: {self.first_error}"
            )


# ---------------------------------------------------------------------------------------------------
# the registry and user rewards


def _no_kwargs(fn: RewardFn) -> Callable[[RewardConfig], RewardFn]:
    def build(cfg: RewardConfig) -> RewardFn:
        if cfg.reward_kwargs:
            raise ValueError(f"reward {cfg.name!r} takes no reward_kwargs, got {sorted(cfg.reward_kwargs)}")
        return fn

    return build


def _build_format(cfg: RewardConfig) -> RewardFn:
    unknown = set(cfg.reward_kwargs) - {"pattern", "match"}
    if unknown or "pattern" not in cfg.reward_kwargs:
        raise ValueError(
            f"reward 'format' needs reward_kwargs 'pattern' (and optional 'match'), got {cfg.reward_kwargs}"
        )
    return make_format_reward(**cfg.reward_kwargs)


def env_reward(prompt: str, response: str, label: Any, metadata: dict) -> float:
    """The reward a multi-turn environment gave its episode (`metadata["env_reward"]`; none given: 0)."""
    if "env_reward" not in metadata:
        raise ValueError("reward 'env': the sample has no environment reward (run with --env or an env task)")
    return float(metadata["env_reward"] or 0.0)


REWARDS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "env": _no_kwargs(env_reward),
    "exact": _no_kwargs(exact_reward),
    "math": _no_kwargs(math_reward),
    "countdown": _no_kwargs(countdown_reward),
    "format": _build_format,
    "remote": lambda cfg: RemoteReward(cfg),
}


def build_reward_fn(cfg: RewardConfig) -> RewardFn:
    """The callable `cfg` names: a registered reward, or a user function with `reward_kwargs` bound."""
    if cfg.name in REWARDS:
        return REWARDS[cfg.name](cfg)
    fn = load_user_reward(cfg.name)
    return functools.partial(fn, **cfg.reward_kwargs) if cfg.reward_kwargs else fn


INPUTS = ("prompt", "response", "label", "metadata", "sample")
GROUP_INPUTS = tuple(name + "s" for name in INPUTS)


def reward_parameters(fn: RewardFn, group: bool, spec: str) -> tuple[str, ...] | None:
    """The input names `fn` takes by name, in its order; None: the four inputs by position (parameters of
    other names, exactly four of them). Raises `ValueError` naming the function's place otherwise."""
    names = GROUP_INPUTS if group else INPUTS
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: trust the documented convention
        return None
    plain = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p for p in plain if p.default is p.empty]
    if any(p.kind == p.VAR_POSITIONAL for p in params) and len(required) <= 4:
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params) and not plain:
        return names
    if all(p.name in names for p in required) and any(p.name in names for p in plain):
        return tuple(p.name for p in plain if p.name in names)
    positional = [p for p in required if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 4 and len(required) == 4:
        return None
    unknown = next((p.name for p in required if p.name not in names), None)
    raise ValueError(
        f"reward {spec!r} ({_place(fn)}): parameter {unknown!r} is none of {', '.join(names)}; name the "
        f"parameters after the inputs you want, e.g. def reward({names[1]}, {names[2]})"
    )


def _place(fn: Any) -> str:
    target = getattr(fn, "func", fn)  # through functools.partial
    call = type(target).__dict__.get("__call__")  # a callable object's method
    code = getattr(target, "__code__", None) or getattr(call, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else type(target).__name__


def load_user_reward(spec: str) -> RewardFn:
    """The function named by 'pkg.module:function' or 'path/to/file.py:function'."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward {spec!r}: expected 'pkg.module:function' or 'path/to/file.py:function'")
    module = _import_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ValueError(f"reward {spec!r}: no module named {e.name!r} (is it on sys.path?)") from None
        raise ValueError(f"reward {spec!r}: importing {name} failed: {e}") from e


def _import_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).resolve()
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: file not found: {path_text}")
    module_name = f"leagues_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None, path
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before exec, as importlib does, so the module can refer to itself
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(f"reward {spec!r}: importing {path_text} failed: {type(e).__name__}: {e}") from e
    return module


# ---------------------------------------------------------------------------------------------------
# remote reward model


class RemoteReward:
    """A reward model behind HTTP; `session()` yields the per-sample async reward function."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.url = cfg.url
        self.retries = cfg.remote_retries
        self.timeout_s = cfg.timeout_s

    @contextlib.asynccontextmanager
    async def session(self):
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            yield functools.partial(self._post, client)

    async def _post(self, client: httpx.AsyncClient, prompt: str, response: str, label: Any, metadata: dict) -> float:
        body = json.dumps({"prompt": prompt, "response": response, "label": label, "metadata": metadata}, default=str)
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            try:
                answer = await client.post(self.url, content=body, headers={"content-type": "application/json"})
            except httpx.TransportError as e:
                error = e
                continue
            if answer.status_code >= 500:
                error = RuntimeError(f"{self.url} answered {answer.status_code}: {answer.text[:200]}")
                continue
            answer.raise_for_status()  # a 4xx: retrying the same request cannot help
            return _remote_value(answer.json())
        raise error


def _remote_value(data: Any) -> Any:
    if isinstance(data, dict):
        if "reward" not in data:
            raise ValueError(f"remote reward answer has no 'reward' key: {str(data)[:200]}")
        return data["reward"]
    return data


# ---------------------------------------------------------------------------------------------------
# the scorer


@dataclass(slots=True)
class _Failure:
    index: int
    message: str
    timed_out: bool = False
    where: str = ""


class RewardScorer:
    """Scores batches of samples with the reward `cfg` names; build once per run, then `score` every step."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.fn = build_reward_fn(cfg)
        remote = isinstance(self.fn, RemoteReward)
        self.inputs = INPUTS[:4] if remote else reward_parameters(self.fn, cfg.group, cfg.name)

    async def score(self, samples: list[Sample]) -> RewardStats:
        """Set `reward` on every sample not already FAILED; failures are marked on the samples and counted."""
        todo = [(i, s) for i, s in enumerate(samples) if s.status != SampleStatus.FAILED]
        stats = RewardStats(skipped=len(samples) - len(todo))
        units = _group_units(todo) if self.cfg.group else [[item] for item in todo]
        semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        session = self.fn.session() if isinstance(self.fn, RemoteReward) else contextlib.nullcontext(self.fn)
        async with session as fn:
            per_unit = await asyncio.gather(*(self._score_unit(fn, unit, semaphore) for unit in units))
        failures = sorted((f for unit_failures in per_unit for f in unit_failures), key=lambda f: f.index)
        stats.failed, stats.timed_out = len(failures), sum(f.timed_out for f in failures)
        stats.scored = len(todo) - stats.failed
        if failures:
            stats.first_error = f"sample {failures[0].index}: {failures[0].message}{failures[0].where}"
        if failures and self.cfg.strict:
            first = failures[0]
            raise RewardError(f"reward {self.cfg.name!r} failed for sample {first.index}: {first.message}")
        return stats

    def score_sync(self, samples: list[Sample]) -> RewardStats:
        """`score` for callers without an event loop."""
        return asyncio.run(self.score(samples))

    def close(self) -> None:
        """Nothing to release: threads of timed-out calls are daemons and finish (or die with the process) on their
        own; kept so a scorer can be used as a context manager."""

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _score_unit(self, fn: RewardFn, unit: list[tuple[int, Sample]], semaphore) -> list[_Failure]:
        """Score one sample (or one group) and write the results; returns the failures."""
        async with semaphore:
            try:
                values = await asyncio.wait_for(self._call(fn, [s for _, s in unit]), self.cfg.timeout_s)
            except TimeoutError:
                message = f"TimeoutError: reward took longer than timeout_s={self.cfg.timeout_s}"
                return [_fail(i, s, message, timed_out=True) for i, s in unit]
            except Exception as e:
                where = _raised_at(e)
                return [_fail(i, s, f"{type(e).__name__}: {e}", where=where) for i, s in unit]
        failures = []
        for (i, sample), value in zip(unit, values, strict=True):
            try:
                sample.reward = _check_reward(value)
            except (TypeError, ValueError) as e:
                failures.append(_fail(i, sample, f"{type(e).__name__}: {e}"))
        return failures

    async def _call(self, fn: RewardFn, samples: list[Sample]) -> list[Any]:
        """The raw reward values of `samples`: one call of a group reward, or one per-sample call."""
        columns = [list(column) for column in zip(*(_reward_inputs(s) for s in samples), strict=True)]
        if not self.cfg.group:
            return [await self._run(fn, [c[0] for c in columns])]
        values = await self._run(fn, columns, GROUP_INPUTS)
        if not isinstance(values, list | tuple) or len(values) != len(samples):
            raise TypeError(f"group reward must return a list of {len(samples)} numbers, got {str(values)[:100]}")
        return list(values)

    async def _run(self, fn: RewardFn, args: list[Any], names: tuple[str, ...] = INPUTS) -> Any:
        """`fn` on the inputs `args` (in `INPUTS` order), by name or, for `inputs` None, the first four by position."""
        if self.inputs is None:
            call = functools.partial(fn, *args[:4])
        else:
            by_name = dict(zip(names, args, strict=True))
            call = functools.partial(fn, **{name: by_name[name] for name in self.inputs})
        if _is_async(fn):
            return await call()
        result = await _on_daemon_thread(call)
        return await result if inspect.isawaitable(result) else result


async def score(samples: list[Sample], cfg: RewardConfig) -> RewardStats:
    """Score once with a scorer built for this call (a run that scores every step keeps a `RewardScorer`)."""
    with RewardScorer(cfg) as scorer:
        return await scorer.score(samples)


def score_sync(samples: list[Sample], cfg: RewardConfig) -> RewardStats:
    """`score` for callers without an event loop."""
    return asyncio.run(score(samples, cfg))


def _group_units(todo: list[tuple[int, Sample]]) -> list[list[tuple[int, Sample]]]:
    groups: dict[int, list[tuple[int, Sample]]] = {}
    for item in todo:
        groups.setdefault(item[1].group_id, []).append(item)
    return list(groups.values())


def _reward_inputs(sample: Sample) -> tuple[str, str, Any, dict, Sample]:
    meta = sample.metadata
    missing = [key for key in ("prompt_text", "response_text") if key not in meta]
    if missing:
        raise KeyError(f"sample metadata lacks {missing} (set by the generate function)")
    return meta["prompt_text"], meta["response_text"], meta.get("label"), meta, sample


class _DaemonWorkers:
    """Daemon threads that run sync reward calls, kept between calls: starting a thread for each call cost ~0.3 ms a
    sample. A call abandoned by a timeout keeps its thread (a running call cannot be stopped); a call that finds no
    idle thread starts one, so a hung call never holds up another."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, daemon=True, name="leagues-reward").start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_WORKERS = _DaemonWorkers()


async def _on_daemon_thread(call: Callable[[], Any]) -> Any:
    """`call()` on a daemon thread, awaited; a caller that stops waiting (a timeout) abandons the call."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # cancelled by a timeout meanwhile
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            ok, value = True, call()
        except BaseException as e:  # handed to the awaiting coroutine, as an executor would
            ok, value = False, e
        with contextlib.suppress(RuntimeError):  # the loop closed while this call ran on
            loop.call_soon_threadsafe(settle, ok, value)

    _WORKERS.submit(run)
    return await future


def _raised_at(error: BaseException) -> str:
    """' (at FILE:LINE)' of the innermost frame that raised `error`, or ''."""
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"


def _is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)  # async __call__


def _check_reward(value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(f"reward must be a number, got {type(value).__name__} {str(value)[:60]!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward must be finite, got {value}")
    return value


def _fail(index: int, sample: Sample, message: str, timed_out: bool = False, where: str = "") -> _Failure:
    sample.status, sample.reward = SampleStatus.FAILED, 0.0
    sample.metadata["error"] = f"reward: {message}"
    return _Failure(index, message, timed_out, where)
