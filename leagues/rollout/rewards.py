"""Reward scoring: a registry of reward functions, user rewards by import spec, a remote reward model, and
the scorer that runs them over a batch of samples without letting one bad sample stop the step.

Where it sits: after generation, before advantages. The loop builds one `RewardScorer(cfg)` per run and
calls `await scorer.score(samples)` (or `scorer.score_sync(samples)`) each step; every sample carries its
inputs in `metadata["prompt_text"]`, `["response_text"]` and `["label"]`, and gets `sample.reward` set.

    REWARDS    exact, math, countdown, format (verifiers.py), remote, env   RewardConfig -> reward function
    user       "pkg.module:function" or "path/to/file.py:function"

A per-sample reward is `fn(prompt, response, label, metadata) -> float`; a group reward (`group=True`) is
`fn(prompts, responses, labels, metadatas) -> list[float]`, called once per prompt group (`sample.group_id`),
e.g. for rewards relative to the other answers. Either may be `async def`. `reward_kwargs` are passed to
user functions as keyword arguments, and configure the built-ins that take any (`format`: `pattern`, `match`).

Decisions:
- Failures are contained: an exception, a timeout (`timeout_s` per call), or a return that is not a finite
  number marks the sample (every sample of the group, for a failed group call) FAILED with reward 0.0 and
  `metadata["error"]` = "reward: <type>: <message>", and is counted in `RewardStats`. `strict=True` turns
  the first failure (lowest sample index) into a `RewardError` after the batch is done. Samples already
  FAILED (by generation) are skipped and keep their error.
- Everything runs concurrently on one event loop, at most `max_concurrency` calls at a time. Sync functions
  run on the scorer's own thread pool, not the loop's default one: a timed-out thread cannot be killed, and
  `asyncio.run` would otherwise wait for it at exit, defeating the timeout. The abandoned thread runs to its
  end in the background and holds a pool slot meanwhile.
- The reward function is resolved once, when the scorer is built: a bad name, module, file or attribute
  raises `ValueError` naming the spec before any rollout. A `.py` file is imported under a name derived
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
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    """Reward calls in flight at once (also the size of the thread pool for sync functions)."""
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


class RewardScorer:
    """Scores batches of samples with the reward `cfg` names; build once per run, then `score` every step."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.fn = build_reward_fn(cfg)
        self._executor = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="leagues-reward")

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
        if failures and self.cfg.strict:
            first = failures[0]
            raise RewardError(f"reward {self.cfg.name!r} failed for sample {first.index}: {first.message}")
        return stats

    def score_sync(self, samples: list[Sample]) -> RewardStats:
        """`score` for callers without an event loop."""
        return asyncio.run(self.score(samples))

    def close(self) -> None:
        """Release the thread pool (threads of timed-out calls finish on their own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

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
                return [_fail(i, s, f"{type(e).__name__}: {e}") for i, s in unit]
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
        values = await self._run(fn, columns)
        if not isinstance(values, list | tuple) or len(values) != len(samples):
            raise TypeError(f"group reward must return a list of {len(samples)} numbers, got {str(values)[:100]}")
        return list(values)

    async def _run(self, fn: RewardFn, args: list[Any]) -> Any:
        if _is_async(fn):
            return await fn(*args)
        result = await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))
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


def _reward_inputs(sample: Sample) -> tuple[str, str, Any, dict]:
    meta = sample.metadata
    missing = [key for key in ("prompt_text", "response_text") if key not in meta]
    if missing:
        raise KeyError(f"sample metadata lacks {missing} (set by the generate function)")
    return meta["prompt_text"], meta["response_text"], meta.get("label"), meta


def _is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)  # async __call__


def _check_reward(value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(f"reward must be a number, got {type(value).__name__} {str(value)[:60]!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward must be finite, got {value}")
    return value


def _fail(index: int, sample: Sample, message: str, timed_out: bool = False) -> _Failure:
    sample.status, sample.reward = SampleStatus.FAILED, 0.0
    sample.metadata["error"] = f"reward: {message}"
    return _Failure(index, message, timed_out)
