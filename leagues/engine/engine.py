"""The rollout engine: requests in, tokens with logprobs (and routes) out, one batch loop.

    Engine(model_or_path, **config)
      .generate(prompts, params)            sync, a whole batch
      await .generate_async(prompt, params) many concurrent callers share the same batch loop
      .abort(request_id) / .load_weights(named_tensors, version) / .sleep() / .wake()

Every request goes through one background thread that owns all engine state and runs the step loop
(schedule → runner → sampler → bookkeeping); callers submit work and wait on futures. Weight loads,
sleep, wake and aborts are queued commands run between steps, so they never race a step.

A request with `n` samples computes its prompt once and forks: the samples share the prompt's KV
blocks, each with its own seed (`seed + index`; a request without a seed gets a random one).
Outputs carry the weight version that produced them.

Expert parallel (`Engine(..., ep_group=group)`): the engines of a group each keep 1/P of every MoE layer's
experts (`leagues.parallel.apply_ep`) and their own requests; tokens visit the experts' ranks by all-to-all
inside the forward. Every forward is therefore collective, so the group's engine threads step in lockstep:
each loop turn, one small all-reduce (on `ep_control_group`, a CPU group) tells every engine whether any of
them has work and whether all have closed; an engine with nothing of its own to run then runs a forward of
no tokens, serving its experts to the others (also while asleep: its weights stay, only its cache goes).
A step that raises leaves its peers inside an exchange this engine will never join, so the engine stops for
good: its requests fail, new ones are refused, and `failure` holds the error for the caller to raise (the
job then ends instead of hanging).
"""

import asyncio
import itertools
import queue
import random
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from leagues.engine.block_manager import BlockManager
from leagues.engine.config import EngineConfig, resolve_device_dtype
from leagues.engine.output import Output, RequestState, make_outputs
from leagues.engine.runner import GraphSampling, ModelRunner
from leagues.engine.sampler import SamplingTensors, int64_pattern, sample
from leagues.engine.scheduler import Scheduler
from leagues.engine.sequence import Sequence
from leagues.model import Transformer, load_pretrained, load_tokenizer, resolve_model_path
from leagues.model.checkpoint import (
    load_named_tensors,
    read_config,
    read_parameters,
    reset_buffers,
    weight_targets,
)
from leagues.parallel import ExpertParallelExperts, apply_ep
from leagues.types import FinishReason, SamplingParams

TokenCallback = Callable[[int, int, float], None]
"""on_token(sample_index, token_id, logprob): one sampled token of a request, called on the engine thread."""


def _num_blocks(model: Transformer, cfg: EngineConfig) -> int:
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    m = model.config
    param = model.embed.weight
    block_bytes = 2 * m.num_layers * cfg.block_size * m.num_kv_heads * m.head_dim * param.element_size()
    if param.is_cuda:
        free, _ = torch.cuda.mem_get_info(param.device)
        return int(free * cfg.kv_cache_fraction) // block_bytes
    return cfg.kv_cache_bytes // block_bytes


def _load_expert_parallel(path: Path, dtype: torch.dtype, device: torch.device, ep_group) -> Transformer:
    """A model holding only this rank's experts, read from the checkpoint without the others ever loading."""
    with torch.device("meta"):
        model = Transformer(read_config(path))
    apply_ep(model, DeviceMesh.from_group(ep_group, device.type))
    per_rank = model.config.num_experts // dist.get_world_size(ep_group)
    lo = dist.get_rank(ep_group) * per_rank
    state = {n: t.to(device=device, dtype=dtype) for n, t in read_parameters(path, (lo, lo + per_rank))}
    model.load_state_dict(state, assign=True, strict=True)
    reset_buffers(model, device)
    return model


class Engine:
    def __init__(
        self, model: str | Path | Transformer, tokenizer=None, ep_group=None, ep_control_group=None, **config
    ) -> None:
        """`ep_group`: the process group of this engine's expert-parallel peers (each holds 1/P of the experts;
        every member must build its engine); `ep_control_group`: a CPU (gloo) group over the same ranks for
        the lockstep handshake (default: `ep_group`, enough on the CPU)."""
        self.config = cfg = EngineConfig(**config)
        if isinstance(model, Transformer):
            self.model = model
            self.model_path = None
        else:
            self.model_path = resolve_model_path(model)
            device, dtype = resolve_device_dtype(cfg)
            if ep_group is not None and dist.get_world_size(ep_group) > 1:
                self.model = _load_expert_parallel(self.model_path, dtype, device, ep_group)
            else:
                self.model = load_pretrained(self.model_path, dtype=dtype, device=device)
            if tokenizer is None and (self.model_path / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(self.model_path)  # without one, prompts are token ids
        self.model.eval().set_moe_impl(cfg.moe_impl)
        self._ep, self._expert_slices, self._weight_targets = None, {}, None
        if ep_group is not None and dist.get_world_size(ep_group) > 1:
            self._ep = (ep_group, ep_control_group or ep_group)
            self._split_experts(ep_group)
            cfg = self.config = replace(cfg, cuda_graphs=False)  # the dispatch reads token counts on the host
        if cfg.deterministic:
            self.model.set_batch_invariant()  # the kernels sync nothing with the host: CUDA graphs still apply
        self.tokenizer = tokenizer
        self.max_model_len = cfg.max_model_len or self.model.config.max_seq_len
        self.eos_ids = _eos_ids(self.model, tokenizer)
        self.blocks = BlockManager(_num_blocks(self.model, cfg), cfg.block_size, cfg.enable_prefix_caching)
        # a sequence must fit the cache alone, else preempting it can never make room for it (livelock)
        self.max_model_len = min(self.max_model_len, self.blocks.num_blocks * cfg.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.chunked_prefill)
        self.model.fuse_qkv()
        self.runner = ModelRunner(self.model, self.blocks.num_blocks, self.max_model_len, cfg)
        self.weight_version = 0
        self.asleep = False
        self.requests: dict[str, RequestState] = {}
        self._rng = random.Random(cfg.seed)
        self._ids = itertools.count()
        self._request_ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failure: Exception | None = None
        """Expert parallel: the error of the step that stopped this engine (its peers cannot step without it)."""
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0, "steps": 0}
        if self._ep is not None:  # peers step in lockstep from now on, whether or not this engine has requests
            self._start_thread()

    def _split_experts(self, ep_group) -> None:
        """Keep this rank's slice of every MoE layer's experts; remember the slices for weight loads."""
        apply_ep(self.model, DeviceMesh.from_group(ep_group, self.model.embed.weight.device.type))
        rank = dist.get_rank(ep_group)
        for name, module in self.model.named_modules():
            if isinstance(module, ExpertParallelExperts):
                lo = rank * module.num_local
                for param in ("w13", "w2"):
                    self._expert_slices[f"{name}.{param}"] = (lo, lo + module.num_local, module.num_experts)

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
        """Queue one request; the future resolves to its list of n outputs.

        `on_token(sample_index, token_id, logprob)` is called on the engine thread for every sampled token
        (for streaming); it must be quick and must not raise.
        """
        prompt_ids = self._tokenize(prompt)
        self._validate(prompt_ids, params)
        future: Future = Future()
        rid = request_id or f"req-{next(self._request_ids)}"
        self._post(("add", (rid, prompt_ids, params, future, on_token)))
        return future

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Copy new weights into the model in place (our or HF names); later outputs carry `version`."""
        self._call(self._load_weights, named_tensors, version)

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
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._closed = True
        self._wake_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop thread ------------------------------------------------------------------------

    def _post(self, message) -> None:
        if self.failure is not None:
            raise RuntimeError(f"expert-parallel engine stopped after a failed step: {self.failure}")
        if self._closed:
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
        self._post(("call", (fn, args, future)))
        return future.result()

    def _loop(self) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":  # the current device is per thread; kernels launch on it (rank r: cuda:r)
            torch.cuda.set_device(device)
        while not self._closed or self._ep is not None:
            self._drain_inbox()
            if self._ep is not None:
                if not self._ep_turn():
                    break
                continue
            if self.asleep or not self.scheduler.has_work():
                self._wake_event.wait(timeout=0.1)
                self._wake_event.clear()
                continue
            try:
                self.step()
            except Exception as err:  # fail every waiting caller rather than hang them
                self._fail_all(err)
        self._drain_inbox()  # requests posted before close() fail below too
        self._fail_all(self.failure or RuntimeError("engine is closed"))

    def _ep_turn(self) -> bool:
        """One lockstep turn of an expert-parallel engine; False once every peer has closed and none has work."""
        mine = not self.asleep and self.scheduler.has_work()
        flags = torch.tensor([int(mine), int(not self._closed)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._ep[1])
        busy, open_peers = bool(flags[0]), bool(flags[1])
        if not busy:
            if not open_peers:
                return False
            self._wake_event.wait(timeout=0.005)
            self._wake_event.clear()
            return True
        try:
            if not (mine and self.step()):
                self.runner.execute_empty()  # our peers' tokens still visit our experts
        except Exception as err:  # the lockstep is broken: stop, and fail every waiting caller
            self.failure = err
            self._fail_all(err)
            return False
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add_request(*payload)
            elif kind == "abort":
                self._abort(payload)
            else:
                fn, args, future = payload
                try:
                    future.set_result(fn(*args))
                except Exception as err:
                    future.set_exception(err)

    def _fail_all(self, err: Exception) -> None:
        for rid in list(self.requests):
            state = self.requests.pop(rid)
            for seq in state.seqs:
                self.scheduler.remove(seq)
            if not state.future.done():
                state.future.set_exception(err)

    # --- requests -------------------------------------------------------------------------------

    def _tokenize(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or Engine(..., tokenizer=...)")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt has token ids outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the limit is {self.max_model_len - 1}")
        if -(-len(prompt_ids) // self.config.block_size) >= self.blocks.num_blocks:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the KV cache")
        if params.return_routed_experts and not self.runner.capture_routes:
            raise ValueError("return_routed_experts needs an MoE model and capture_routes=True")

    def _add_request(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, future: Future, on_token=None
    ) -> None:
        if rid in self.requests:
            future.set_exception(ValueError(f"request id {rid!r} is already in flight"))
            return
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        if params.seed is None:  # the sampler rejects sampled rows without a seed
            params = replace(params, seed=base_seed)
        seq = Sequence(
            next(self._ids),
            rid,
            0,
            list(prompt_ids),
            len(prompt_ids),
            params,
            base_seed,
            num_forks=params.n - 1,
            first_weight_version=self.weight_version,
        )
        self.requests[rid] = RequestState(rid, future, [seq], params.n, on_token=on_token)
        self.stats["prompt_tokens"] += len(prompt_ids)
        if params.max_new_tokens == 0:
            self._finish(seq, FinishReason.LENGTH)
            return
        self.scheduler.add(seq)

    def _abort(self, rid: str) -> None:
        state = self.requests.get(rid)
        if state is None:
            return
        for seq in list(state.seqs):
            if seq.finish_reason is None:
                self._finish(seq, FinishReason.ABORT)

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> bool:
        """Schedule and run one batch; False when there was nothing to run."""
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        sampling = [item.seq for item in batch.items if item.samples]
        logits_RV, result = self.runner.execute(batch, self._graph_sampling(batch, sampling))
        for item in batch.items:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register_computed(item.seq)
        if result is None:
            rows, row_index = self._fork_samples(sampling)
            tensors = self._sampling_tensors(rows)
            result = sample(logits_RV.index_select(0, row_index), tensors, self.config.deterministic)
        else:
            rows = sampling
        self._append_tokens(rows, result)
        self.stats["steps"] += 1
        return True

    def _fork_samples(self, sampling: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """Sequences that sample, with forked siblings reading their parent's logits row."""
        rows, index = [], []
        for r, seq in enumerate(sampling):
            rows.append(seq)
            index.append(r)
            for _ in range(seq.num_forks):
                child = replace(
                    seq,
                    seq_id=next(self._ids),
                    sample_index=len(self.requests[seq.request_id].seqs),
                    token_ids=list(seq.token_ids),
                    logprobs=[],
                    top_logprobs=[],
                    block_table=[],
                    block_hashes=[],
                    num_forks=0,
                )
                self.blocks.fork(seq, child)
                self.requests[seq.request_id].seqs.append(child)
                self.scheduler.running.append(child)
                rows.append(child)
                index.append(r)
            seq.num_forks = 0
        return rows, torch.tensor(index, dtype=torch.int64, device=self.runner.device)

    def _sampling_tensors(self, rows: list[Sequence]) -> SamplingTensors:
        seeds = [_row_seed(s) for s in rows]
        return SamplingTensors.from_params([(s.params, s.num_output_tokens) for s in rows], self.runner.device, seeds)

    def _graph_sampling(self, batch, sampling: list[Sequence]) -> GraphSampling | None:
        """The rows' sampling inputs when a decode step's graph can sample them (no truncation, no top
        logprobs, not deterministic mode); None leaves sampling to `sample` after the step."""
        if not (batch.is_decode and self.runner.graphs) or self.config.deterministic:
            return None
        if any(s.params.top_logprobs or (s.params.temperature > 0 and _truncates(s.params)) for s in sampling):
            return None
        return GraphSampling(
            temperature=[float(s.params.temperature) for s in sampling],
            seeds=[int64_pattern(_row_seed(s)) for s in sampling],
            steps=[s.num_output_tokens for s in sampling],
        )

    def _append_tokens(self, rows: list[Sequence], result) -> None:
        token_ids = result.token_ids_B.tolist()
        logprobs = result.logprobs_B.tolist()
        top = None
        if result.top_ids_BK is not None:
            top = list(zip(result.top_ids_BK.tolist(), result.top_logprobs_BK.tolist(), strict=True))
        for i, seq in enumerate(rows):
            seq.token_ids.append(token_ids[i])
            seq.logprobs.append(logprobs[i])
            if top is not None and seq.params.top_logprobs:
                k = seq.params.top_logprobs
                seq.top_logprobs.append(list(zip(top[i][0][:k], top[i][1][:k], strict=True)))
            seq.weight_version = self.weight_version
            self.stats["generated_tokens"] += 1
            if (on_token := self.requests[seq.request_id].on_token) is not None:
                on_token(seq.sample_index, token_ids[i], logprobs[i])
            if (reason := self._stop_reason(seq)) is not None:
                self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        token, params = seq.token_ids[-1], seq.params
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop if s and s in text]
            if hits:
                seq.stop_text_end = min(hits)
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        state = self.requests[seq.request_id]
        if seq.params.return_routed_experts and seq.num_computed_tokens > 0:
            state.routes[seq.sample_index] = self.runner.routes_of(seq.block_table, seq.num_computed_tokens)
        self.stats["cached_tokens"] += seq.num_cached_prompt_tokens
        self.scheduler.remove(seq)
        self._complete_if_done(state)

    def _complete_if_done(self, state: RequestState) -> None:
        if any(s.finish_reason is None for s in state.seqs):
            return
        del self.requests[state.request_id]
        state.future.set_result(make_outputs(state, self.tokenizer))

    # --- weights and memory ---------------------------------------------------------------------

    def _load_weights(self, named_tensors, version: int | None) -> int:
        if self._expert_slices:
            named_tensors = [self._local_experts(name, tensor) for name, tensor in named_tensors]
        if self._weight_targets is None:  # the parameters never change identity: walk the modules once
            self._weight_targets = weight_targets(self.model)
        count = load_named_tensors(self.model, named_tensors, self._weight_targets)
        self.blocks.reset_prefix_cache()  # cached keys and values came from the old weights
        self.weight_version = self.weight_version + 1 if version is None else version
        return count

    def _local_experts(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """An expert-parallel engine takes full [E, ...] expert tensors (our names) and keeps its slice."""
        if name in self._expert_slices:
            lo, hi, total = self._expert_slices[name]
            return name, tensor[lo:hi] if tensor.shape[0] == total else tensor
        if ".experts." in name:
            raise ValueError(f"weight {name!r}: an expert-parallel engine loads experts by our names (w13, w2)")
        return name, tensor

    def _sleep(self, offload_weights: bool) -> None:
        if self.asleep:
            return
        if offload_weights and self._ep is not None:
            raise ValueError("an expert-parallel engine keeps its weights while asleep: its peers use its experts")
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)
        self.blocks.reset_prefix_cache()
        self.runner.free_cache()
        if offload_weights:
            self._weights_device = self.runner.device
            self.model.fuse_qkv(on=False)
            for param in self.model.parameters():
                param.data = param.data.to("cpu")
        self.asleep = True

    def _wake(self) -> None:
        if not self.asleep:
            return
        device = getattr(self, "_weights_device", None)
        if device is not None:
            for param in self.model.parameters():
                param.data = param.data.to(device)
            self.model.rope.reset(device)
            self.model.fuse_qkv()  # the per-parameter moves broke the fused q/k/v views
            self._weights_device = None
        self.runner.allocate_cache()
        self.asleep = False


def _row_seed(seq: Sequence) -> int:
    """The seed of one sample of a request: distinct per sample index."""
    return (seq.seed + seq.sample_index * 0x9E3779B97F4A7C15) % 2**62


def _truncates(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1 or params.min_p > 0


def _eos_ids(model: Transformer, tokenizer) -> set[int]:
    ids = model.config.hf_config.get("eos_token_id")
    eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos
