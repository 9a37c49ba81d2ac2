"""Runs one scheduled step on the model: inputs, paged attention, CUDA graphs, routes, logits.

The runner owns the device-side state of the engine: the KV cache (`[2, L, N+1, S, G, A]`, the extra
block is a scratch target for padded rows of captured graphs) and, for MoE models, a routing cache
beside it (`[N+1, S, L_moe, K]`, compact ints) so the experts of every computed token are kept per
slot, survive prefix sharing and preemption, and can be returned with the output.

Decode steps on CUDA replay a CUDA graph captured for the next batch size up (padding rows point at the
scratch block), and so do prefills and mixed steps of up to a few hundred tokens
(`leagues.engine.prefill_graphs`); everything else runs without graphs. Sizes whose attention grid (a program per
sequence and KV head) leaves SMs idle get a second graph with split-K attention, replayed when the batch's longest
context spans more than two splits: the RL long tail of few sequences with long contexts. The model's blocks, rotary
tables and final norm are compiled by default on CUDA (`EngineConfig.compile_model`: `torch.compile` fuses
norms, rotary, router and MoE glue; attention is the opaque `leagues::paged_attend` operator, so the cache is
never traced). A graph holds the whole decode step: the forward, the LM head, the routes' cache write and, for
rows without truncation, the sampler (`sampler.sample_in_step`: `sample_plain`'s tokens; in deterministic mode
their logprobs by the trainer's batch-invariant arithmetic). Its inputs live in one persistent buffer
(`DecodeBuffers`): the host fills one of two pinned copies in place and one host-to-device copy a step moves it;
the sampled tokens and logprobs come back in one small copy each. Such steps are *launched* (`launch`, then `land`
waits for their tokens), with or without a graph, so the engine can start the next step first: a row's input
token may be taken on the device from the previous step's samples.

Legend: T tokens in the step, B sequences, M max blocks per sequence, V vocab, D model dim.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from leagues.engine import memory
from leagues.engine.attention import OpaqueAttention, PagedAttention, active_backend
from leagues.engine.config import EngineConfig
from leagues.engine.prefill_graphs import FreshGraphs, RaggedGraphs
from leagues.engine.prefill_graphs import supported as fresh_supported
from leagues.engine.sampler import GraphSampling, sample_in_step
from leagues.engine.scheduler import ScheduledBatch
from leagues.kernels.paged_attention import decode_split_tokens, key_slots
from leagues.model import ForwardBatch, Transformer
from leagues.model.transformer import raise_recompile_limit


class _NoTokens:
    """The attention backend of a forward of no tokens."""

    invariant_len = 0

    def attend(self, layer_idx: int, q_THA, k_TGA, v_TGA):
        return q_THA


_FIELDS = (
    ("input_ids", torch.int64),
    ("prev_rows", torch.int64),
    ("positions", torch.int64),
    ("slots", torch.int64),
    ("seeds", torch.int64),
    ("steps", torch.int64),
    ("temperature", torch.float32),
    ("context_lens", torch.int32),
)


class DecodeBuffers:
    """The persistent inputs and outputs of decode steps that sample in the step: typed views of one byte
    buffer resident on the device, filled from one of two pinned host copies (a step fills one while the copy
    of the step before may still be queued) by one copy a step. The block table comes last, so the copy stops
    after the rows the step uses. `sampled` keeps the last step's tokens on the device: a row whose
    `prev_rows` is r >= 0 takes its input token from row r of the step before (overlap scheduling)."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        layout, offset = {}, 0
        for name, dtype in _FIELDS:
            layout[name] = (offset, dtype, (max_rows,))
            offset += -(-max_rows * dtype.itemsize // 8) * 8
        layout["block_tables"] = (offset, torch.int32, (max_rows, max_blocks))
        self.max_rows, self.table_offset, self.row_bytes = max_rows, offset, max_blocks * 4
        size = offset + max_rows * self.row_bytes
        pinned = device.type == "cuda"
        self.host_bytes = [torch.zeros(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.device_bytes = torch.zeros(size, dtype=torch.uint8, device=device)
        self.hosts = [{name: view.numpy() for name, view in self._views(b, layout).items()} for b in self.host_bytes]
        """The host copies' typed views, as numpy arrays: filling them from lists costs a fraction of `torch.tensor`."""
        self.tables = [[None] * max_rows for _ in range(2)]
        self.table_lens = [[0] * max_rows for _ in range(2)]
        """Per host copy and row: the block table list whose first `table_lens` entries the row holds (None: not
        a sequence's). Tables only grow in place (`BlockManager.allocate_slots`), so a step writes the new
        entries of grown tables and moves rows whose sequence sat elsewhere, not every table."""
        self.device = self._views(self.device_bytes, layout)
        self.sampled = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.tokens_out = [torch.zeros(max_rows, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.logprobs_out = [torch.zeros(max_rows, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if pinned else [None, None]
        self.turn = 0

    @property
    def host(self) -> dict[str, np.ndarray]:
        return self.hosts[self.turn]

    def forget_tables(self, start: int, end: int) -> None:
        """Rows start..end of the current host copy's block tables hold no sequence's table."""
        self.tables[self.turn][start:end] = [None] * (end - start)

    def fill_tables(self, tables: list[list[int]]) -> None:
        """The block tables of the current host copy's first rows (entries past a table's length are never
        read: attention masks them by context length)."""
        turn, n = self.turn, len(tables)
        held, held_lens, view = self.tables[turn], self.table_lens[turn], self.hosts[turn]["block_tables"]
        lens = list(map(len, tables))
        rows_held = zip(range(n), tables, lens, held, held_lens, strict=False)
        stale = [i for i, t, k, h, hk in rows_held if t is not h or k != hk]
        if not stale:
            return
        rows, cols, values, moves, where = [], [], [], {}, None
        for i in stale:
            table, length = tables[i], lens[i]
            if table is held[i] and held_lens[i] <= length:
                start = held_lens[i]  # grown in place
            else:
                if where is None:  # rows shifted (a sequence before them ended): find where tables sat
                    where = {id(t): j for j, t in enumerate(held) if t is not None}
                j = where.get(id(table), -1)
                start = held_lens[j] if j >= 0 and held[j] is table and held_lens[j] <= length else 0
                if start:
                    moves[i] = j
            rows.extend([i] * (length - start))
            cols.extend(range(start, length))
            values.extend(table[start:])
        if moves:  # the gather reads every source row before any row is written
            width = max(held_lens[j] for j in moves.values())
            view[list(moves), :width] = view[list(moves.values()), :width]
        if values:
            view[rows, cols] = values
        for i in stale:
            held[i], held_lens[i] = tables[i], lens[i]

    def flip(self) -> dict[str, np.ndarray]:
        """The other host copy, for the next step (the one before last has landed: its copy is done)."""
        self.turn ^= 1
        return self.host

    @staticmethod
    def _views(buffer: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
        views = {}
        for name, (offset, dtype, shape) in layout.items():
            num_bytes = dtype.itemsize * torch.Size(shape).numel()
            views[name] = buffer[offset : offset + num_bytes].view(dtype).view(shape)
        return views

    def upload(self, num_rows: int) -> None:
        end = self.table_offset + num_rows * self.row_bytes
        self.device_bytes[:end].copy_(self.host_bytes[self.turn][:end], non_blocking=True)


@dataclass(slots=True)
class Launched:
    """A decode step on its way: its tokens and logprobs land in the `turn` output copies after `event`."""

    num_rows: int
    turn: int
    event: torch.cuda.Event | None


@dataclass(slots=True)
class StepInputs:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    attention: PagedAttention
    sample_rows_R: torch.Tensor
    """Flat index of the last token of every sequence that samples this step."""


def _decode_compiled(cfg: EngineConfig, device: torch.device) -> bool:
    if cfg.compile_model not in ("auto", "true", "false"):
        raise ValueError(f"engine.compile_model: expected auto, true or false, got {cfg.compile_model!r}")
    if cfg.compile_model == "auto":
        return device.type == "cuda" and cfg.cuda_graphs and not cfg.deterministic
    return cfg.compile_model == "true"


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, max_model_len: int, cfg: EngineConfig) -> None:
        self.model = model
        self.block_size = cfg.block_size
        self.max_blocks = -(-max_model_len // cfg.block_size)
        self.capture_routes = cfg.capture_routes and model.config.num_moe_layers > 0
        self.invariant_logprobs = cfg.deterministic
        """Deterministic mode: a step's logprobs by the trainer's batch-invariant arithmetic
        (`sampler.invariant_logprobs`). The engine's setting, not the model's: a model another engine made
        batch-invariant still gets the fused sampler's logprobs in this one's steps."""
        self.attention_impl = cfg.attention_impl
        self.use_graphs = cfg.cuda_graphs
        self.graph_batch_sizes = sorted(cfg.graph_batch_sizes)
        self.num_blocks = num_blocks
        self.compiled = _decode_compiled(cfg, self.device)
        """Decode steps and the sampler run through `torch.compile`."""
        if self.compiled:
            _compile_modules(model)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.long_graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        """Decode graphs with split-K attention, for the sizes whose one-pass grid leaves SMs idle; replayed when
        the batch's longest context spans more than two splits (the RL long tail: few sequences, long contexts)."""
        cuda = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        rows = max(cfg.max_num_seqs, *self.graph_batch_sizes) if self.use_graphs else cfg.max_num_seqs
        self.buffers = DecodeBuffers(rows, self.max_blocks, self.device)
        prefill_tokens = min(cfg.prefill_graph_tokens, cfg.max_num_batched_tokens)
        other_graphs = self.use_graphs and cuda and prefill_tokens >= 16 and not cfg.deterministic
        self.fresh_graphs = FreshGraphs(self, prefill_tokens) if other_graphs and fresh_supported(self) else None
        self.ragged_graphs = RaggedGraphs(self, prefill_tokens, cfg.max_num_seqs) if other_graphs else None
        """Graphs of the steps that are not plain decodes (`leagues.engine.prefill_graphs`)."""
        self.kv_cache = self.routes_cache = None
        self._memory: memory.MappedMemory | None = None
        self._views: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.allocate_cache()

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def allocate_cache(self) -> None:
        """The KV and routes caches (zeroed), and the decode graphs. On CUDA the caches live in one mapped range
        (`MappedMemory`): after `free_cache` they come back at the same addresses, so the graphs stay valid."""
        cfg = self.model.config
        kv_shape = (2, cfg.num_layers, self.num_blocks + 1, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        kv_dtype = self.model.embed.weight.dtype
        routes_shape = (self.num_blocks + 1, self.block_size, cfg.num_moe_layers, cfg.top_k)
        routes_dtype = cfg.expert_id_dtype()
        if self._memory is None and memory.supported(self.device):
            kv_bytes = -(-torch.Size(kv_shape).numel() * kv_dtype.itemsize // 256) * 256
            routes_bytes = torch.Size(routes_shape).numel() * routes_dtype.itemsize if self.capture_routes else 0
            self._memory = memory.MappedMemory(kv_bytes + routes_bytes, self.device)
            self._views = (self._memory.view(kv_dtype, kv_shape), None)
            if self.capture_routes:
                self._views = (self._views[0], self._memory.view(routes_dtype, routes_shape, offset=kv_bytes))
        if self._memory is not None:
            if not self._memory.mapped:
                torch.cuda.empty_cache()  # what others freed while the cache slept may still be held by torch
            self._memory.remap()
            self.kv_cache, self.routes_cache = self._views
            self.kv_cache.zero_()  # new physical pages hold anything; padded reads must see finite values
            if self.routes_cache is not None:
                self.routes_cache.zero_()
        else:
            self.kv_cache = torch.zeros(kv_shape, dtype=kv_dtype, device=self.device)
            if self.capture_routes:
                self.routes_cache = torch.zeros(routes_shape, dtype=routes_dtype, device=self.device)
        if self.use_graphs and self.device.type == "cuda" and not self.graphs:
            self.capture_graphs()

    def free_cache(self) -> None:
        """Give the caches' memory back. Mapped: the physical pages only (graphs kept for `allocate_cache`);
        otherwise the tensors and the graphs that point at them."""
        self.kv_cache = self.routes_cache = None  # a stray read while asleep fails in Python, not on the device
        if self._memory is not None:
            self._memory.release()
            return
        self._drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def cache_bytes(self) -> int:
        """Device bytes the KV and routes caches hold while allocated."""
        if self._memory is not None:
            return self._memory.num_bytes
        return sum(t.numel() * t.element_size() for t in (self.kv_cache, self.routes_cache) if t is not None)

    def offload_weights(self) -> None:
        """Weights to host memory (the caller has freed the cache); `restore_weights` brings them back at new
        addresses, so the decode graphs are captured again."""
        self._drop_graphs()
        self._weights_device = self.device
        self.model.fuse_qkv(on=False)
        for param in self.model.parameters():
            param.data = param.data.to("cpu")
        torch.cuda.empty_cache()  # the graphs' pool and the weights' old storage

    def restore_weights(self) -> None:
        device = getattr(self, "_weights_device", None)
        if device is None:
            return
        for param in self.model.parameters():
            param.data = param.data.to(device)
        self.model.rope.reset(device)
        self.model.fuse_qkv()  # the per-parameter moves broke the fused q/k/v views
        self._weights_device = None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (keys, values, routes) before they are written."""
        if not copies:
            return
        src, dst = (torch.tensor(c, device=self.device) for c in zip(*copies, strict=True))
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if self.routes_cache is not None:
            self.routes_cache[dst] = self.routes_cache[src]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        ids, positions, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
        size = self.block_size
        for item in batch.items:
            seq, start, end = item.seq, item.seq.num_computed_tokens, item.seq.num_computed_tokens + item.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // size] * size + p % size for p in range(start, end))
            q_lens.append(end - start)
            ctx_lens.append(end)
            tables.append(seq.block_table)
        ends = list(itertools.accumulate(q_lens))
        sample_rows = [end - 1 for end, item in zip(ends, batch.items, strict=True) if item.samples]
        width = max(len(t) for t in tables)
        tensor = lambda x, dtype=torch.int64: torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)  # noqa: E731
        block_tables_BM = tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)
        context_lens_B = tensor(ctx_lens, torch.int32)
        fresh = all(c == q for c, q in zip(ctx_lens, q_lens, strict=True))
        attention = PagedAttention(
            kv_cache_2LNSGA=self.kv_cache,
            slots_T=tensor(slots),
            block_tables_BM=block_tables_BM,
            context_lens_B=context_lens_B,
            cu_seqlens_q_B1=tensor([0, *ends], torch.int32),
            max_q=max(q_lens),
            max_k=max(ctx_lens),
            is_decode=batch.is_decode,
            fresh=fresh,
            impl=self.attention_impl,
            # cached prefixes: where every key lives, once for all layers, without reading its count back
            keys=None if batch.is_decode or fresh else key_slots(block_tables_BM, context_lens_B, size, sum(ctx_lens)),
        )
        return StepInputs(tensor(ids), tensor(positions), attention, tensor(sample_rows))

    def _run(self, attention: PagedAttention, input_ids_T, positions_T):
        """The model over the step's tokens: final hidden states [T, D]; routes go to their cache slots.
        Compiled, the blocks attend through the opaque operator with `attention` active."""
        batch = ForwardBatch(
            input_ids_T=input_ids_T,
            positions_T=positions_T,
            attention=OpaqueAttention() if self.compiled else attention,
            capture_experts=self.capture_routes,
            compute_logits=False,
        )
        with active_backend(attention):
            if self.compiled:
                raise_recompile_limit()  # dynamo's settings are per thread: the engine's thread and the caller's
            out = self.model.run(batch)
        if self.capture_routes:
            cfg = self.model.config
            self.routes_cache.view(-1, cfg.num_moe_layers, cfg.top_k)[attention.slots_T] = out.routed_experts_TLK
        return out.hidden_TD

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [R, V] (float32) of the sequences that sample this step, in batch order."""
        self.copy_blocks(batch.copies)
        graph_size = self._graph_size(batch)
        if graph_size is not None:
            seqs = [item.seq for item in batch.items]
            graph, outputs = self._graph_for(self._fill(seqs, None, None, graph_size), graph_size)
            graph.replay()
            return outputs["logits"][: len(batch.items)].float()
        for graphs in self._step_graphs:
            bucket = graphs.bucket(batch)
            if bucket is not None:
                return graphs.run(batch, bucket)
        inputs = self.prepare(batch)
        hidden_TD = self._run(inputs.attention, inputs.input_ids_T, inputs.positions_T)
        return self.model.logits(hidden_TD[inputs.sample_rows_R]).float()

    @property
    def max_launch_rows(self) -> int:
        """The largest decode step `launch` takes."""
        return self.buffers.max_rows

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, sampling: GraphSampling, prev_rows: list[int]) -> Launched:
        """Start a decode step that samples in the step (a CUDA graph's replay, else the same step run eagerly)
        and queue the copy of its tokens and logprobs to the host, without waiting for either: `land` waits.
        `prev_rows[i] >= 0`: row i's input token is row `prev_rows[i]` of the previous launch's samples, still
        on the device (its host token is a placeholder)."""
        self.copy_blocks(batch.copies)
        seqs = [item.seq for item in batch.items]
        num_rows, graph_size = len(seqs), self._graph_size(batch)
        longest = self._fill(seqs, sampling, prev_rows, graph_size or num_rows)
        if graph_size is not None:
            graph, outputs = self._graph_for(longest, graph_size)
            graph.replay()
        else:
            outputs = self._graph_step(num_rows, self._eager_attention(seqs))
        turn = self.buffers.turn
        self.buffers.tokens_out[turn][:num_rows].copy_(outputs["tokens"][:num_rows], non_blocking=True)
        self.buffers.logprobs_out[turn][:num_rows].copy_(outputs["logprobs"][:num_rows], non_blocking=True)
        event = self.buffers.events[turn]
        if event is not None:
            event.record()
        return Launched(num_rows, turn, event)

    def land(self, launched: Launched) -> tuple[list[int], list[float]]:
        """Wait for a launched step; its sampled tokens and logprobs."""
        if launched.event is not None:
            launched.event.synchronize()
        n, turn = launched.num_rows, launched.turn
        return self.buffers.tokens_out[turn][:n].tolist(), self.buffers.logprobs_out[turn][:n].tolist()

    @torch.inference_mode()
    def execute_empty(self) -> None:
        """A forward of no tokens: an expert-parallel engine with nothing of its own to run still takes part in
        every MoE layer's exchange, so its peers' tokens reach its experts (no cache needed: no attention)."""
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        self.model.run(ForwardBatch(input_ids_T=empty, positions_T=empty, attention=_NoTokens(), compute_logits=False))

    def routes_of(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Recorded experts [num_tokens, L_moe, K] of a sequence's first `num_tokens` tokens (CPU)."""
        cfg = self.model.config
        pos = torch.arange(num_tokens)
        table = torch.tensor(block_table, dtype=torch.int64)
        slots = (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)
        return self.routes_cache.view(-1, cfg.num_moe_layers, cfg.top_k)[slots].cpu()

    # --- CUDA graphs for decode -------------------------------------------------------------

    @property
    def _step_graphs(self) -> list:
        return [g for g in (self.fresh_graphs, self.ragged_graphs) if g is not None]

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        if not (batch.is_decode and self.graphs):
            return None
        return next((size for size in sorted(self.graphs) if size >= len(batch.items)), None)

    def _graph_for(self, longest: int, size: int) -> tuple[torch.cuda.CUDAGraph, dict]:
        """The graph of `size` rows for a batch whose longest sequence has `longest` tokens: split-K when one
        exists and the longest context spans > 2 splits."""
        long = self.long_graphs.get(size)
        if long is not None and longest > 2 * long[1]["attention"].split_tokens:
            return long
        return self.graphs[size]

    def _split_tokens(self, num_rows: int, max_tokens: int) -> int | None:
        """Split-K's split size for a decode of `num_rows` rows over at most `max_tokens` keys (None: one pass).
        Deterministic mode keeps its own batch-invariant attention."""
        if self.device.type != "cuda" or self.model.invariant_len:
            return None
        return decode_split_tokens(num_rows, self.model.config.num_kv_heads, max_tokens, self.num_sms)

    def _drop_graphs(self) -> None:
        self.graphs.clear()
        self.long_graphs.clear()
        for graphs in self._step_graphs:
            graphs.clear()

    def _static_attention(self, size: int, split_tokens: int | None = None) -> PagedAttention:
        dev = self.buffers.device
        return PagedAttention(
            kv_cache_2LNSGA=self.kv_cache,
            slots_T=dev["slots"][:size],
            block_tables_BM=dev["block_tables"][:size],
            context_lens_B=dev["context_lens"][:size],
            cu_seqlens_q_B1=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            max_q=1,
            max_k=self.max_blocks * self.block_size,
            is_decode=True,
            fresh=False,
            impl=self.attention_impl,
            split_tokens=split_tokens,
        )

    def _eager_attention(self, seqs) -> PagedAttention:
        """The backend of a launched step run without a graph: the buffers' rows, as wide as the batch needs."""
        dev, n = self.buffers.device, len(seqs)
        width, longest = max(len(s.block_table) for s in seqs), max(s.num_tokens for s in seqs)
        split = self._split_tokens(n, width * self.block_size)
        return PagedAttention(
            kv_cache_2LNSGA=self.kv_cache,
            slots_T=dev["slots"][:n],
            block_tables_BM=dev["block_tables"][:n, :width],
            context_lens_B=dev["context_lens"][:n],
            cu_seqlens_q_B1=torch.arange(n + 1, dtype=torch.int32, device=self.device),
            max_q=1,
            max_k=longest,
            is_decode=True,
            fresh=False,
            impl=self.attention_impl,
            split_tokens=split if split is not None and longest > 2 * split else None,
        )

    def _graph_step(self, size: int, attention: PagedAttention) -> dict:
        """What a decode graph runs: the model, the LM head and the plain sampler (`sample_in_step`) over the
        static buffers. Input tokens of rows continuing the previous step come from its samples, still on the
        device."""
        dev, sampled = self.buffers.device, self.buffers.sampled
        prev_R = dev["prev_rows"][:size]
        input_ids_B = torch.where(prev_R >= 0, sampled[prev_R.clamp(min=0)], dev["input_ids"][:size])
        hidden_BD = self._run(attention, input_ids_B, dev["positions"][:size])
        logits_BV = self.model.logits(hidden_BD)
        args = (dev["temperature"][:size], dev["seeds"][:size], dev["steps"][:size])
        token_ids_B, logprobs_B = sample_in_step(logits_BV, *args, invariant=self.invariant_logprobs)
        sampled[:size].copy_(token_ids_B)
        return {"logits": logits_BV, "tokens": token_ids_B, "logprobs": logprobs_B}

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        self._drop_graphs()
        sizes = sorted(self.graph_batch_sizes, reverse=True)
        self._fill_padding(0, sizes[0])
        self.buffers.upload(sizes[0])
        pool = torch.cuda.graph_pool_handle()
        for size in sizes:
            self.graphs[size] = self._capture(size, self._static_attention(size), pool)
            split = self._split_tokens(size, self.max_blocks * self.block_size)
            if split is not None:
                self.long_graphs[size] = self._capture(size, self._static_attention(size, split), pool)
        for graphs in self._step_graphs:
            graphs.capture(pool)

    def _capture(self, size: int, attention: PagedAttention, pool) -> tuple[torch.cuda.CUDAGraph, dict]:
        self._graph_step(size, attention)  # compile, warm up kernels and autotuning outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = self._graph_step(size, attention)
        # the graph reads what the backend holds (deterministic mode's tiles, cu_seqlens): keep it alive
        return graph, outputs | {"attention": attention}

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows start..end of the host buffer as padding: they write to and read from the scratch block."""
        if start >= end:
            return
        host = self.buffers.host
        for name in ("input_ids", "positions", "seeds", "steps"):
            host[name][start:end] = 0
        host["prev_rows"][start:end] = -1
        host["temperature"][start:end] = 0.0
        host["slots"][start:end] = self.num_blocks * self.block_size
        host["context_lens"][start:end] = 1
        host["block_tables"][start:end] = self.num_blocks
        self.buffers.forget_tables(start, end)

    def _fill(self, seqs, sampling: GraphSampling | None, prev_rows: list[int] | None, size: int) -> int:
        """The next host copy of the decode buffers for `seqs` (padded to `size` rows), moved by one copy; the
        longest sequence's token count. Numpy fills the pinned copy from the rows' lists in place."""
        host, n, block = self.buffers.flip(), len(seqs), self.block_size
        tokens = [s.token_ids for s in seqs]
        last = np.fromiter(map(len, tokens), np.int64, n) - 1
        input_ids = host["input_ids"][:n]
        input_ids[:] = [t[-1] for t in tokens]
        np.maximum(input_ids, 0, out=input_ids)  # a placeholder's row reads its token on the device
        host["prev_rows"][:n] = prev_rows if prev_rows is not None else -1
        host["positions"][:n] = last
        host["context_lens"][:n] = last + 1
        self.buffers.fill_tables([s.block_table for s in seqs])
        blocks = host["block_tables"][np.arange(n), last // block].astype(np.int64)
        host["slots"][:n] = blocks * block + last % block
        if sampling is not None:
            host["temperature"][:n] = sampling.temperature
            host["seeds"][:n] = sampling.seeds
            host["steps"][:n] = sampling.steps
        self._fill_padding(n, size)
        self.buffers.upload(size)
        return int(last.max()) + 1


def _compile_modules(model: Transformer) -> None:
    """`torch.compile` the blocks, the rotary tables and the final norm in place, sizes dynamic. The blocks
    share one graph (parameters are its inputs; attention is the opaque operator, which takes no layer
    index), so compiling costs one trace for every size >= 2 and one for size 1, not one per layer."""
    model.compile_blocks(dynamic=True)
    model.rope.compile(dynamic=True)
    model.norm.compile(dynamic=True)
