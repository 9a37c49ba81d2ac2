"""The rollout engine: requests in, tokens with logprobs (and routes) out, one batch loop.

    Engine(model_or_path, tokenizer=None, config=EngineConfig(...), **overrides)
      .generate(prompts, params)            sync, a whole batch
      await .generate_async(prompt, params) many concurrent callers share the same batch loop
      .abort(request_id) / .load_weights(named_tensors, version) / .sleep() / .wake()

One background thread owns all engine state and runs the step loop in nano-vllm's shape: the scheduler
picks the batch, the runner computes and samples it, the scheduler post-processes its tokens (append, stop
rules), and `requests.Requests` forks, streams and finishes requests (`leagues.engine.step`, which also
launches a decode step before the one in flight lands: overlap scheduling). Callers send typed messages (`Add`,
`Abort`, `Call`) and wait on futures, so weight loads, sleep, wake and aborts run between steps and never
race one. Outputs carry the weight version that produced them.

Expert parallel (`Engine(..., ep_group=group)`): the engines of a group each keep 1/P of every MoE layer's
experts and step in lockstep (`leagues.engine.expert_parallel`); a step that raises stops the engine for
good: its requests fail, new ones are refused, and `failure` holds the error for the caller to raise.
"""

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import torch

from leagues.engine.block_manager import BlockManager
from leagues.engine.config import EngineConfig, num_kv_blocks, resolve_device_dtype
from leagues.engine.expert_parallel import Lockstep, is_split, load_expert_parallel
from leagues.engine.output import Output
from leagues.engine.requests import Abort, Add, Call, PromptLimits, Requests, TokenCallback, prompt_ids, resolve
from leagues.engine.runner import ModelRunner
from leagues.engine.scheduler import Scheduler, StopRules
from leagues.engine.step import Stepper
from leagues.model import Transformer, load_pretrained, load_tokenizer, resolve_model_path
from leagues.model.checkpoint import load_named_tensors, weight_targets
from leagues.types import SamplingParams


def checkpoint_tokenizer(path: Path):
    """The tokenizer a checkpoint directory carries, or None (prompts are then token ids)."""
    return load_tokenizer(path) if (path / "tokenizer.json").is_file() else None


class Engine:
    def __init__(
        self,
        model: str | Path | Transformer,
        tokenizer=None,
        config: EngineConfig | None = None,
        *,
        ep_group=None,
        ep_control_group=None,
        **overrides,
    ) -> None:
        """`config` (default `EngineConfig()`) with fields replaced by `overrides`; `ep_group`/`ep_control_group`:
        expert-parallel peers and a CPU group over them (`leagues.engine.expert_parallel`)."""
        cfg = replace(config or EngineConfig(), **overrides)
        self.model_path = None if isinstance(model, Transformer) else resolve_model_path(model)
        if self.model_path is None:
            self.model = model
        else:
            device, dtype = resolve_device_dtype(cfg)
            if is_split(ep_group):
                self.model = load_expert_parallel(self.model_path, dtype, device, ep_group)
            else:
                self.model = load_pretrained(self.model_path, dtype=dtype, device=device)
            tokenizer = tokenizer if tokenizer is not None else checkpoint_tokenizer(self.model_path)
        self.model.eval().set_moe_impl(cfg.moe_impl)
        self._lockstep = Lockstep(self.model, ep_group, ep_control_group) if is_split(ep_group) else None
        if self._lockstep is not None:
            # the dispatch reads token counts on the host, and every step must run a forward in lockstep
            cfg = replace(cfg, cuda_graphs=False, overlap_scheduling="false")
        if cfg.deterministic:
            self.model.set_batch_invariant()  # the kernels sync nothing with the host: CUDA graphs still apply
        self.config, self.tokenizer, self._weight_targets = cfg, tokenizer, None
        self.blocks = BlockManager(num_kv_blocks(self.model, cfg), cfg.block_size, cfg.enable_prefix_caching)
        # a sequence must fit the cache alone, else preempting it can never make room for it (livelock)
        max_len = cfg.max_model_len or self.model.config.max_seq_len
        self.max_model_len = min(max_len, self.blocks.num_blocks * cfg.block_size)
        stop = StopRules.of(self.model.config.hf_config, tokenizer, self.max_model_len)
        mixed = cfg.mixed_steps and not cfg.deterministic
        self.scheduler = Scheduler(
            self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.chunked_prefill, stop, mixed
        )
        self.model.fuse_qkv()
        self.runner = ModelRunner(self.model, self.blocks.num_blocks, self.max_model_len, cfg)
        vocab, capture = self.model.config.vocab_size, self.runner.capture_routes
        self.prompt_limits = PromptLimits(vocab, self.max_model_len, cfg.block_size, self.blocks.num_blocks, capture)
        self.weight_version, self.asleep, self.closed = 0, False, False
        self.table = Requests(self.scheduler, self.blocks, tokenizer, self.runner.routes_of, cfg.seed)
        self.requests, self.stats = self.table.states, self.table.stats
        self._request_ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stepper = Stepper(self.scheduler, self.runner, self.table, cfg, self._inbox, lambda: self.weight_version)
        self._wake_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: Exception | None = None
        """Expert parallel: the error of the step that stopped this engine (its peers cannot step without it)."""
        if self._lockstep is not None:  # peers step in lockstep from now on, with or without requests
            self._start_thread()

    # --- public API ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] = None,
        on_output: Callable[[list[Output]], None] | None = None,
    ) -> list[Output]:
        """Outputs of every prompt, prompt-major (n samples per prompt are consecutive)."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        futures = [self.submit(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results = []
        for future in futures:
            outputs = future.result()
            if on_output:
                on_output(outputs)
            results.extend(outputs)
        return results

    async def generate_async(
        self,
        prompt: list[int] | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Output]:
        """The n outputs of one prompt; many callers may await concurrently."""
        return await asyncio.wrap_future(self.submit(prompt, params or SamplingParams(), request_id, on_token))

    def submit(
        self,
        prompt: list[int] | str,
        params: SamplingParams,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> Future:
        """Queue one request; the future resolves to its list of n outputs. `on_token(sample_index, token_id,
        logprob)` runs on the engine thread for every sampled token (streaming): quick; one that raises is dropped."""
        ids = prompt_ids(prompt, self.tokenizer)
        self.prompt_limits.check(ids, params)
        future: Future = Future()
        rid = request_id or f"req-{next(self._request_ids)}"
        self._post(Add(rid, ids, params, future, on_token))
        return future

    def abort(self, request_id: str) -> None:
        self._post(Abort(request_id))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Copy new weights into the model in place (our or HF names); later outputs carry `version`. Returns how
        many tensors were loaded."""
        return self._call(self._load_weights, named_tensors, version)

    def sleep(self, offload_weights: bool = False) -> None:
        """Free the KV cache (running requests are paused and recomputed on wake); optionally offload weights."""
        self._call(self._sleep, offload_weights)

    def wake(self) -> None:
        self._call(self._wake)

    def flush_cache(self) -> None:
        self._call(self.blocks.reset_prefix_cache)

    @property
    def is_alive(self) -> bool:
        """Whether the loop thread runs (it starts with the first request or call)."""
        return not self.closed and self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self.closed = True
        self._wake_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop thread ------------------------------------------------------------------------

    def _post(self, message) -> None:
        if self.failure is not None:
            raise RuntimeError(f"expert-parallel engine stopped after a failed step: {self.failure}")
        if self.closed:
            raise RuntimeError("engine is closed")
        self._inbox.put(message)
        self._start_thread()
        self._wake_event.set()

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="leagues-engine", daemon=True)
            self._thread.start()

    def _call(self, fn, *args):
        future: Future = Future()
        self._post(Call(fn, args, future))
        return future.result()

    def idle(self, timeout: float) -> None:
        """Wait for new work (or `timeout` seconds) on the loop thread."""
        self._wake_event.wait(timeout=timeout)
        self._wake_event.clear()

    def _loop(self) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":  # the current device is per thread; kernels launch on it (rank r: cuda:r)
            torch.cuda.set_device(device)
        while not self.closed or self._lockstep is not None:
            self._drain_inbox()
            if self._lockstep is not None:
                if not self._lockstep.turn(self):
                    break
            elif self.asleep or not self.scheduler.has_work():
                self.idle(timeout=0.1)
            else:
                try:
                    self.step()
                except Exception as err:  # fail every waiting caller rather than hang them
                    self.fail_all(err)
        self._drain_inbox()  # requests posted before close() fail below too
        self.fail_all(self.failure or RuntimeError("engine is closed"))

    def _drain_inbox(self) -> None:
        messages = []
        with contextlib.suppress(queue.Empty):
            while True:
                messages.append(self._inbox.get_nowait())
        if self.stepper.inflight is not None and not all(isinstance(m, Add) for m in messages):
            self.stepper.land()  # aborts and calls see sequences without placeholders (a new request touches none)
        for message in messages:
            try:
                if isinstance(message, Add):
                    self.table.add(message, self.weight_version)
                elif isinstance(message, Abort):
                    self.table.abort(message.request_id)
                else:
                    resolve(message.future, message.fn(*message.args))
            except Exception as err:  # one bad message fails its caller, never the loop thread
                if not isinstance(message, Abort):
                    resolve(message.future, error=err)

    def fail_all(self, err: Exception) -> None:
        self.stepper.inflight = None
        self.table.fail_all(err)

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> bool:
        """Schedule, run and post-process one batch (`leagues.engine.step`); False when there was nothing to run."""
        return self.stepper.step()

    # --- weights and memory ---------------------------------------------------------------------

    def _load_weights(self, named_tensors, version: int | None) -> int:
        if self._lockstep is not None:
            named_tensors = [self._lockstep.local(name, tensor) for name, tensor in named_tensors]
        if self._weight_targets is None:  # the parameters never change identity: walk the modules once
            self._weight_targets = weight_targets(self.model)
        count = load_named_tensors(self.model, named_tensors, self._weight_targets)
        self.blocks.reset_prefix_cache()  # cached keys and values came from the old weights
        self.weight_version = self.weight_version + 1 if version is None else version
        return count

    def _sleep(self, offload_weights: bool) -> None:
        if self.asleep:
            return
        if offload_weights and self._lockstep is not None:
            raise ValueError("an expert-parallel engine keeps its weights while asleep: its peers use its experts")
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)
        self.blocks.reset_prefix_cache()
        self.runner.free_cache()
        if offload_weights:
            self.runner.offload_weights()
        self.asleep = True

    def _wake(self) -> None:
        if not self.asleep:
            return
        self.runner.restore_weights()
        self.runner.allocate_cache()
        self.asleep = False
