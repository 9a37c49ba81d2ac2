"""Runs one scheduled step on the model: inputs, paged attention, CUDA graphs, routes, logits.

The runner owns the device-side state of the engine: the KV cache (`[2, L, N+1, S, G, A]`, the extra
block is a scratch target for padded rows of captured graphs) and, for MoE models, a routing cache
beside it (`[N+1, S, L_moe, K]`, compact ints) so the experts of every computed token are kept per
slot, survive prefix sharing and preemption, and can be returned with the output.

Decode steps on CUDA replay a CUDA graph captured for the next batch size up (padding rows point at
the scratch block); everything else runs eagerly.

Legend: T tokens in the step, B sequences, M max blocks per sequence, V vocab, D model dim.
"""

import itertools
from dataclasses import dataclass

import torch

from leagues.engine.attention import PagedAttention
from leagues.engine.scheduler import ScheduledBatch
from leagues.model import ForwardBatch, Transformer


class _NoTokens:
    """The attention backend of a forward of no tokens."""

    invariant_len = 0

    def attend(self, layer_idx: int, q_THA, k_TGA, v_TGA):
        return q_THA


@dataclass(slots=True)
class StepInputs:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    attention: PagedAttention
    sample_rows_R: torch.Tensor
    """Flat index of the last token of every sequence that samples this step."""


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_model_len: int, **options) -> None:
        self.model = model
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.capture_routes = options.get("capture_routes", True) and model.config.num_moe_layers > 0
        self.attention_impl = options.get("attention_impl", "auto")
        self.use_graphs = options.get("cuda_graphs", True)
        self.graph_batch_sizes = options.get("graph_batch_sizes", [1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.num_blocks = num_blocks
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.kv_cache = self.routes_cache = None
        self.allocate_cache()

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def allocate_cache(self) -> None:
        cfg = self.model.config
        shape = (2, cfg.num_layers, self.num_blocks + 1, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.model.embed.weight.dtype, device=self.device)
        if self.capture_routes:
            routes_shape = (self.num_blocks + 1, self.block_size, cfg.num_moe_layers, cfg.top_k)
            self.routes_cache = torch.zeros(routes_shape, dtype=cfg.expert_id_dtype(), device=self.device)
        if self.use_graphs and self.device.type == "cuda":
            self.capture_graphs()

    def free_cache(self) -> None:
        self.graphs.clear()
        self.kv_cache = self.routes_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        attention = PagedAttention(
            kv_cache_2LNSGA=self.kv_cache,
            slots_T=tensor(slots),
            block_tables_BM=tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            context_lens_B=tensor(ctx_lens, torch.int32),
            cu_seqlens_q_B1=tensor([0, *ends], torch.int32),
            max_q=max(q_lens),
            max_k=max(ctx_lens),
            is_decode=batch.is_decode,
            fresh=all(c == q for c, q in zip(ctx_lens, q_lens, strict=True)),
            impl=self.attention_impl,
        )
        return StepInputs(tensor(ids), tensor(positions), attention, tensor(sample_rows))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, D]; routes of every token go to their cache slots."""
        batch = ForwardBatch(
            input_ids_T=inputs.input_ids_T,
            positions_T=inputs.positions_T,
            attention=inputs.attention,
            capture_experts=self.capture_routes,
            compute_logits=False,
        )
        out = self.model.run(batch)
        if self.capture_routes:
            cfg = self.model.config
            self.routes_cache.view(-1, cfg.num_moe_layers, cfg.top_k)[inputs.attention.slots_T] = out.routed_experts_TLK
        return out.hidden_TD

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [R, V] (float32) of the sequences that sample this step, in batch order."""
        self.copy_blocks(batch.copies)
        inputs = self.prepare(batch)
        graph_size = self._graph_size(batch)
        if graph_size is not None:
            return self._replay(graph_size, inputs)[inputs.sample_rows_R].float()
        hidden_TD = self._forward(inputs)
        return self.model.logits(hidden_TD[inputs.sample_rows_R]).float()

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

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        if not (batch.is_decode and self.graphs):
            return None
        return next((size for size in sorted(self.graphs) if size >= len(batch.items)), None)

    def _static_inputs(self, size: int) -> StepInputs:
        scratch = self.num_blocks  # padded rows write into the scratch block
        tensor = lambda fill, n, dtype=torch.int64: torch.full((n,), fill, dtype=dtype, device=self.device)  # noqa: E731
        attention = PagedAttention(
            kv_cache_2LNSGA=self.kv_cache,
            slots_T=tensor(scratch * self.block_size, size),
            block_tables_BM=torch.full((size, self.max_blocks), scratch, dtype=torch.int32, device=self.device),
            context_lens_B=tensor(1, size, torch.int32),
            cu_seqlens_q_B1=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            max_q=1,
            max_k=self.max_blocks * self.block_size,
            is_decode=True,
            fresh=False,
            impl=self.attention_impl,
        )
        return StepInputs(tensor(0, size), tensor(0, size), attention, torch.arange(size, device=self.device))

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        self.graphs.clear()
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.graph_batch_sizes, reverse=True):
            static = self._static_inputs(size)
            self.model.logits(self._forward(static))  # warm up kernels and autotuning outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits_BV = self.model.logits(self._forward(static))
            self.graphs[size] = (graph, {"inputs": static, "logits": logits_BV})

    def _replay(self, size: int, inputs: StepInputs) -> torch.Tensor:
        graph, state = self.graphs[size]
        static: StepInputs = state["inputs"]
        n = inputs.input_ids_T.shape[0]
        static.input_ids_T[:n] = inputs.input_ids_T
        static.positions_T[:n] = inputs.positions_T
        static.attention.slots_T[:n] = inputs.attention.slots_T
        static.attention.slots_T[n:] = self.num_blocks * self.block_size
        static.attention.context_lens_B[:n] = inputs.attention.context_lens_B
        static.attention.context_lens_B[n:] = 1
        width = inputs.attention.block_tables_BM.shape[1]
        static.attention.block_tables_BM[:n, :width] = inputs.attention.block_tables_BM
        graph.replay()
        return state["logits"][:n]
