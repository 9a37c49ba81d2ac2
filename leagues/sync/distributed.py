"""Weights to HTTP engines by torch.distributed broadcast: the trainer side of SGLang's weight-update protocol.

    sender = DistributedWeightSender(engine_urls, master_address, master_port, backend="nccl", api_key="k")
    sender.init()                                   # the engines join a group of 1 + len(engine_urls) ranks
    sender.send(trainer.state_dict_for_sync(), weight_version=7)
    failures = sender.send_to(fleet_targets, trainer.state_dict_for_sync(), weight_version=8)  # the RL loop's
    sender.close()

Where it sits: after a training step, in disaggregated or external-engine runs; the engine side is
`leagues/engine/remote_weights.py` behind `leagues serve` (or an SGLang server: the protocol is theirs).
`init()` creates the TCP store as its master, posts `/init_weights_update_group` to every engine at once
(engine i gets `rank_offset` 1 + i) and joins as rank 0. For each bucket, `send()` posts
`/update_weights_from_distributed` (names, dtypes, shapes, group name, weight version) to every engine
from background threads while it broadcasts the bucket's tensors from rank 0 in the same order, then
waits for the answers. The RL loop calls `send_to` with the engines its fleet says should serve
(`leagues.serve.fleet.Fleet.weight_targets`) and hands the failures back to the fleet.

Decisions:
- The group is built directly over the store (`ProcessGroupGloo`/`ProcessGroupNCCL`), beside any default
  group the trainer has, so FSDP's group is untouched; the store's master does not wait for workers, since
  the workers are told to connect only after it exists. Every request carries its engine's headers (the run's
  key); a refused key is reported as such (`leagues.sync.engine_http`).
- One group per set of engines. `send_to` forms a new one (over the same store, under a new name: a name's old
  rendezvous keys would mislead the new one) when its targets are not the current group's members, or one of
  them is rejoining (a restarted engine is not in any group). So a dead engine is left out and a restarted one
  gets the weights before it serves, as on disk.
- Before a rendezvous, every engine is asked to leave the group it was last in (`/destroy_weights_update_group`):
  it frees that group's memory, and it shows that the engine is up and takes weight work with the key sent. An
  engine that does not (unreachable, or its key refused) is left out, with its error, before the rendezvous
  begins: a rendezvous that some engine never joins holds rank 0 and the others until it times out.
- An engine that dies during `send_to` (its request is refused or its connection drops) is dropped, and the
  others take the bucket again, in a new group of their own, then the remaining buckets: the bucket is still in
  rank 0's memory, so nothing is gathered twice (the other trainer ranks gather with rank 0). The broadcasts to
  the dead engine fail at once, but gloo may cut those to the others short too, and they then answer only when
  their own wait times out (`leagues serve --limits.weight_group_timeout`, 300 s by default): the price of a
  death in the middle of a send, against none when it died before (the fleet leaves it out of the targets).
- Fail fast rather than hang: an engine that is up but refuses (an HTTP error status, or `success: false` on
  join) ends `init()`/`send()` at once with its message, even while broadcasts or the rendezvous still wait for
  it (`close()` then waits such a rendezvous out, up to `timeout_s`). Such a group is out of step, so the sender
  refuses further sends until `init()` forms a new one; `send_to` reports every engine of it failed (the fleet
  quarantines them; live ones take the next weights in a new group). An engine that answers `success: false`
  to an update has still taken part in the broadcasts (it checks names and shapes and drops what does not
  fit), so the group stays usable and only that engine has failed.
- Broadcasts of a bucket are issued asynchronously and waited after the answers: the bucket (already
  materialised by the trainer) is the only memory in flight. Dtypes travel as names ("bfloat16").
- `weight_version` travels as a string of an int, as SGLang expects; the engines stamp outputs with it.
"""

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import timedelta

import httpx
import torch
import torch.distributed as dist

from leagues.sync.engine_http import EngineRefused, EngineUnreachable, died, key_refused, post
from leagues.types import WeightTarget

Bucket = Sequence[tuple[str, torch.Tensor]]
LEAVE_ROUTE = "/destroy_weights_update_group"
LEAVE_TIMEOUT_S = 10.0
"""Seconds an engine gets to leave an old group (one that takes longer is left out of the new group)."""


class GroupFailed(EngineRefused):
    """A weight-update group could not form; `at_fault` names the engines that failed, with their errors, and
    `started` says whether the rendezvous had begun (if not, the others can form a group without them)."""

    def __init__(self, message: str, at_fault: dict[str, BaseException], started: bool) -> None:
        super().__init__(message)
        self.at_fault, self.started = at_fault, started


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _nccl(store: dist.Store, rank: int, size: int, timeout: timedelta):
    if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA and a torch built with NCCL; use 'gloo'")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


BACKENDS: dict[str, Callable] = {"gloo": _gloo, "nccl": _nccl}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _in_daemon_thread(fn: Callable) -> Future:
    """Run `fn` in a daemon thread (a rendezvous nobody joins must not keep the process alive)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except Exception as err:
            future.set_exception(err)

    threading.Thread(target=run, name="leagues-weight-sync-join", daemon=True).start()
    return future


def _first_failure(futures: Sequence[Future]) -> BaseException | None:
    """Wait until all finish or one fails; that failure, else None."""
    wait(futures, return_when=FIRST_EXCEPTION)
    return next((f.exception() for f in futures if f.done() and f.exception() is not None), None)


class DistributedWeightSender:
    """Rank 0 of a weight-update group with one rank per engine; sends buckets of named tensors."""

    def __init__(
        self,
        engine_urls: Sequence[str],
        master_address: str,
        master_port: int,
        backend: str = "nccl",
        group_name: str = "weight_update_group",
        *,
        device: str | torch.device | None = None,
        timeout_s: float = 1800.0,
        api_key: str | None = None,
    ) -> None:
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.urls = [url.rstrip("/") for url in engine_urls]
        """The engines of the current group, in rank order (rank 1 + i)."""
        self.headers = {url: {"Authorization": f"Bearer {api_key}"} if api_key else {} for url in self.urls}
        """What the requests to each engine carry (`send_to` takes its targets' own)."""
        self.master_address, self.master_port = master_address, master_port
        self.backend, self.base_name, self.group_name = backend, group_name, group_name
        self.world_size = 1 + len(self.urls)
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.timeout = timedelta(seconds=timeout_s)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=30.0))
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="leagues-weight-sync")
        self._store: dist.Store | None = None
        self._pg = None
        self._broken: str | None = None
        self._joins: list[Future] = []
        self._num_groups = 0
        self._group_of: dict[str, str] = {}
        """The group each engine last joined (it leaves it before joining another)."""

    def __enter__(self) -> "DistributedWeightSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- groups -----------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the store (once), have every engine of `urls` leave its old group and join a new one, join it as
        rank 0; raises `GroupFailed` if any engine refuses or cannot be reached."""
        self._form(self.urls)

    def _form(self, urls: Sequence[str]) -> None:
        self._leave()
        if self._store is None:
            address, port, world = self.master_address, self.master_port, 1 + len(urls)
            self._store = dist.TCPStore(
                address, port, world, is_master=True, wait_for_workers=False, timeout=self.timeout
            )
        self.urls, self.world_size = list(urls), 1 + len(urls)
        self.group_name = self.base_name if not self._num_groups else f"{self.base_name}-{self._num_groups}"
        self._num_groups += 1
        self._pool.shutdown(wait=False)  # every engine's request must be in flight at once: a thread each
        self._pool = ThreadPoolExecutor(max_workers=max(len(urls), 1), thread_name_prefix="leagues-weight-sync")
        if refused := self._leave_groups(urls):  # before any rendezvous: one nobody joins would wait `timeout_s`
            self._broken = "init failed: " + "; ".join(map(str, refused.values()))
            message = f"weight-update group {self.group_name!r} not formed: {'; '.join(map(str, refused.values()))}"
            raise GroupFailed(message, refused, started=False)
        posts = {url: self._pool.submit(self._join_engine, rank, url) for rank, url in enumerate(urls, start=1)}
        store, world = dist.PrefixStore(self.group_name, self._store), self.world_size
        joined = _in_daemon_thread(lambda: BACKENDS[self.backend](store, 0, world, self.timeout))
        self._joins = [*(j for j in self._joins if not j.done()), joined]
        if (err := _first_failure([*posts.values(), joined])) is not None:
            self._broken = f"init failed: {err}"
            at_fault = {url: f.exception() for url, f in posts.items() if f.done() and f.exception() is not None}
            raise GroupFailed(f"weight-update group {self.group_name!r}: {err}", at_fault, started=True) from err
        self._pg = joined.result()
        self._broken = None
        self._group_of.update(dict.fromkeys(urls, self.group_name))

    def _join_engine(self, rank: int, url: str) -> dict:
        body = {
            "master_address": self.master_address,
            "master_port": self.master_port,
            "rank_offset": rank,
            "world_size": self.world_size,
            "group_name": self.group_name,
            "backend": self.backend,
        }
        answer = self._post(url, "/init_weights_update_group", body)
        if not answer.get("success"):
            raise EngineRefused(f"{url}: {answer.get('message')}")
        return answer

    def _leave(self) -> None:
        """Rank 0 leaves the current group (after a failed rendezvous, that one is left to time out)."""
        if self._pg is not None:
            self._pg.shutdown()
        self._pg = None

    def _leave_groups(self, urls: Sequence[str]) -> dict[str, BaseException]:
        """Each engine of `urls` leaves the group it was last in (one that has none, restarted say, is asked to
        leave one of the new group's name: an old run's), which also shows, before any rendezvous begins, that it
        is up and takes weight work with its key. Returns the engines that are not or do not, with their errors
        (another refusal, such as a server without this route, is no reason to leave an engine out)."""
        asks = {
            url: self._pool.submit(self._post, url, LEAVE_ROUTE, {"group_name": name}, LEAVE_TIMEOUT_S)
            for url in urls
            for name in [self._group_of.pop(url, self.group_name)]
        }
        wait(asks.values())
        errors = {url: future.exception() for url, future in asks.items()}
        return {url: err for url, err in errors.items() if isinstance(err, EngineUnreachable) or key_refused(err)}

    def _post(self, url: str, route: str, body: dict, timeout_s: float | None = None) -> dict:
        return post(url, route, body, headers=self.headers.get(url), client=self._http, timeout_s=timeout_s)

    # --- sending ----------------------------------------------------------------------------------

    def send(self, buckets: Iterable[Bucket], weight_version: int) -> int:
        """Broadcast every bucket to every engine of the group; returns the number of tensors sent. Raises
        `EngineRefused` at the first failure."""
        count = 0
        for bucket in buckets:
            self._send_bucket(bucket, weight_version)
            count += len(bucket)
        return count

    def _send_bucket(self, bucket: Bucket, weight_version: int) -> None:
        if self._pg is None or self._broken:
            raise RuntimeError(f"sender is not ready: {self._broken or 'call init() first'}")
        posts, works = self._post_bucket(bucket, weight_version)
        if (err := _first_failure(list(posts.values()))) is not None:  # that engine takes no part: out of step
            self._broken = f"an update failed: {err}"
            raise EngineRefused(f"weight update (version {weight_version}): {err}; init() forms a new group") from err
        for work in works:
            work.wait()
        refused = [f"{url}: {f.result().get('message')}" for url, f in posts.items() if not f.result().get("success")]
        if refused:
            raise EngineRefused(f"weight update (version {weight_version}) refused: " + "; ".join(refused))

    def _post_bucket(self, bucket: Bucket, weight_version: int) -> tuple[dict[str, Future], list]:
        """Post the bucket's update to every engine of the group and broadcast its tensors: (posts, works)."""
        tensors = [tensor.detach().to(self.device).contiguous() for _, tensor in bucket]
        body = {
            "names": [name for name, _ in bucket],
            "dtypes": [dtype_name(t.dtype) for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "group_name": self.group_name,
            "flush_cache": True,
            "weight_version": str(weight_version),
        }
        posts = {url: self._pool.submit(self._post, url, "/update_weights_from_distributed", body) for url in self.urls}
        return posts, [self._pg.broadcast(t, 0) for t in tensors]

    # --- the fleet's form -------------------------------------------------------------------------

    def send_to(
        self, targets: Sequence[WeightTarget], buckets: Iterable[Bucket], weight_version: int
    ) -> dict[str, BaseException]:
        """Every bucket to `targets` (the engines that are to serve `weight_version`, with their headers), in a new
        group when they are not the current group; an engine that fails is dropped and the others go on. Returns
        the failures by URL (empty: every target took every bucket). Every bucket is taken from `buckets`
        whatever happens, since other trainer ranks gather them with this one."""
        failures: dict[str, BaseException] = {}
        self.headers.update({t.url: dict(t.headers) for t in targets})
        urls = [t.url for t in targets]
        current = self._pg is not None and not self._broken and set(urls) == set(self.urls)
        live = urls if current and not any(t.rejoining for t in targets) else self._regroup(urls, failures)
        for bucket in buckets:
            if live:
                live = self._bucket_to(bucket, weight_version, failures)
        return failures

    def _regroup(self, urls: Sequence[str], failures: dict[str, BaseException]) -> list[str]:
        """A group of `urls`, without those that refuse before its rendezvous; the engines in it (none when it
        could not form: all of them failed)."""
        while urls:
            try:
                self._form(urls)
            except GroupFailed as err:
                if err.started:  # an engine failed in the rendezvous: the others wait in it, out of reach
                    failures.update({url: err.at_fault.get(url, err) for url in urls})
                    return []
                failures.update(err.at_fault)
                urls = [url for url in urls if url not in err.at_fault]
                continue
            return list(self.urls)
        return []

    def _bucket_to(self, bucket: Bucket, weight_version: int, failures: dict[str, BaseException]) -> list[str]:
        """One bucket to the group, recording failures; the engines the next bucket goes to."""
        posts, works = self._post_bucket(bucket, weight_version)
        # each engine answers once it has the bucket, or, when a dead engine cut the broadcasts short, once its
        # own wait for them times out (the engine's weight-group timeout): nothing rank 0 does ends it sooner
        wait(posts.values())
        errors = {url: f.exception() for url, f in posts.items() if f.exception() is not None}
        if not all(died(err) for err in errors.values()):  # up, but taking no part: the broadcasts may never end
            self._broken = f"an update failed: {next(iter(errors.values()))}"
            interrupted = EngineRefused(f"weight update (version {weight_version}) interrupted: {self._broken}")
            failures.update({url: errors.get(url, interrupted) for url in self.urls if url not in failures})
            return []
        for work in works:  # those to a dead engine fail at once
            with contextlib.suppress(RuntimeError):
                work.wait()
        if errors:  # the others may hold part of the bucket: it goes again, to a group of them
            for url, err in errors.items():
                failures.setdefault(url, err)
            if not self._regroup([url for url in self.urls if url not in errors], failures):
                return []
            return self._bucket_to(bucket, weight_version, failures)
        for url, future in posts.items():  # an engine that refused took part: the group is in step
            if not future.result().get("success"):
                failures.setdefault(url, EngineRefused(f"{url}: {future.result().get('message')}"))
        return list(self.urls)

    def close(self) -> None:
        """Leave the group, have its engines leave it too (best effort), and release the store, threads and
        connections.

        After a failed `init()` this waits for the abandoned rendezvous to time out (`timeout_s`): a process
        that exits while gloo still waits in it aborts.
        """
        for joining in self._joins:
            wait([joining], timeout=self.timeout.total_seconds() + 10)
        if self._pg is not None and not self._broken:
            self._leave_groups(list(self.urls))
        self._leave()
        self._store = None
        self._pool.shutdown(wait=False)
        self._http.close()
