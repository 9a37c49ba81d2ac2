"""Weights to HTTP engines by torch.distributed broadcast: the trainer side of SGLang's weight-update protocol.

    sender = DistributedWeightSender(engine_urls, master_address, master_port, backend="nccl")
    sender.init()                                   # the engines join a group of 1 + len(engine_urls) ranks
    sender.send(trainer.state_dict_for_sync(), weight_version=7)
    sender.close()

Where it sits: after a training step, in disaggregated or external-engine runs; the engine side is
`leagues/engine/remote_weights.py` behind `leagues serve` (or an SGLang server: the protocol is theirs).
`init()` creates the TCP store as its master, posts `/init_weights_update_group` to every engine at once
(engine i gets `rank_offset` 1 + i) and joins as rank 0. For each bucket, `send()` posts
`/update_weights_from_distributed` (names, dtypes, shapes, group name, weight version) to every engine
from background threads while it broadcasts the bucket's tensors from rank 0 in the same order, then
waits for the answers.

Decisions:
- The group is built directly over the store (`ProcessGroupGloo`/`ProcessGroupNCCL`), beside any default
  group the trainer has, so FSDP's group is untouched; the store's master does not wait for workers, since
  the workers are told to connect only after it exists.
- Fail fast rather than hang: an engine that refuses (HTTP error, 4xx/5xx, or `success: false` on join)
  ends `init()`/`send()` at once with its message, even while broadcasts or the rendezvous still wait for
  it (`close()` then waits the rendezvous out, up to `timeout_s`). Such a
  group is out of step, so the sender refuses further sends: close it and make a new one (new port). An
  engine that answers `success: false` to an update has still taken part in the broadcasts (it checks
  names and shapes and drops what does not fit), so the group stays usable and only `send()` raises.
- Broadcasts of a bucket are issued asynchronously and waited after the answers: the bucket (already
  materialised by the trainer) is the only memory in flight. Dtypes travel as names ("bfloat16").
- `weight_version` travels as a string of an int, as SGLang expects; the engines stamp outputs with it.
"""

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import timedelta

import httpx
import torch
import torch.distributed as dist


class EngineRefused(RuntimeError):
    """An engine answered a weight-update request with an error (or could not be reached)."""


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
    ) -> None:
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.urls = [url.rstrip("/") for url in engine_urls]
        self.master_address, self.master_port = master_address, master_port
        self.backend, self.group_name = backend, group_name
        self.world_size = 1 + len(self.urls)
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.timeout = timedelta(seconds=timeout_s)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=30.0))
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="leagues-weight-sync")
        self._store: dist.Store | None = None
        self._pg = None
        self._broken: str | None = None
        self._joining: Future | None = None

    def __enter__(self) -> "DistributedWeightSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- setup ------------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the store, have every engine join, join as rank 0; raises if any engine refuses."""
        address, port, world = self.master_address, self.master_port, self.world_size
        self._store = dist.TCPStore(address, port, world, is_master=True, wait_for_workers=False, timeout=self.timeout)
        posts = [self._pool.submit(self._join_engine, rank, url) for rank, url in enumerate(self.urls, start=1)]
        store = dist.PrefixStore(self.group_name, self._store)
        self._joining = joined = _in_daemon_thread(lambda: BACKENDS[self.backend](store, 0, world, self.timeout))
        if (err := _first_failure([*posts, joined])) is not None:
            self._broken = f"init failed: {err}"
            raise EngineRefused(f"weight-update group {self.group_name!r}: {err}") from err
        self._pg = joined.result()
        self._broken = None

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

    def _post(self, url: str, route: str, body: dict) -> dict:
        """The engine's JSON answer; EngineRefused on a transport error or an HTTP error status."""
        try:
            response = self._http.post(url + route, json=body)
        except httpx.HTTPError as err:
            raise EngineRefused(f"{url}{route}: {err!r}") from err
        if response.status_code != 200:
            raise EngineRefused(f"{url}{route}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    # --- sending ----------------------------------------------------------------------------------

    def send(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], weight_version: int) -> int:
        """Broadcast every bucket to every engine; returns the number of tensors sent."""
        count = 0
        for bucket in buckets:
            self._send_bucket(bucket, weight_version)
            count += len(bucket)
        return count

    def _send_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]], weight_version: int) -> None:
        if self._pg is None or self._broken:
            raise RuntimeError(f"sender is not ready: {self._broken or 'call init() first'}")
        tensors = [tensor.detach().to(self.device).contiguous() for _, tensor in bucket]
        body = {
            "names": [name for name, _ in bucket],
            "dtypes": [dtype_name(t.dtype) for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "group_name": self.group_name,
            "flush_cache": True,
            "weight_version": str(weight_version),
        }
        posts = [self._pool.submit(self._post, url, "/update_weights_from_distributed", body) for url in self.urls]
        works = [self._pg.broadcast(t, 0) for t in tensors]
        if (err := _first_failure(posts)) is not None:  # that engine takes no part: the group is out of step
            self._broken = f"an update failed: {err}"
            raise EngineRefused(f"weight update (version {weight_version}): {err}; make a new sender") from err
        for work in works:
            work.wait()
        refused = [
            f"{url}: {f.result().get('message')}"
            for url, f in zip(self.urls, posts, strict=True)
            if not f.result()["success"]
        ]
        if refused:
            raise EngineRefused(f"weight update (version {weight_version}) refused: " + "; ".join(refused))

    def close(self) -> None:
        """Leave the group and release the store, threads and connections (engines keep their side).

        After a failed `init()` this waits for the abandoned rendezvous to time out (`timeout_s`): a process
        that exits while gloo still waits in it aborts.
        """
        if self._joining is not None:
            wait([self._joining], timeout=self.timeout.total_seconds() + 10)
        if self._pg is not None:
            self._pg.shutdown()
        self._pg = self._store = None
        self._pool.shutdown(wait=False)
        self._http.close()
