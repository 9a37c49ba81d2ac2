"""CUDA graphs for the steps that are not plain decodes: prefills and mixed steps without the host's launch overhead.

A prefill of a few hundred tokens is launch-bound: about a thousand kernels whose host work (the compiled
blocks' launches, custom operators, Triton's launcher) cost ~20 ms on an H200 where the GPU needs ~2 ms, and
every request of a server waits for one (its own, or the one running when it arrives). Two kinds of graphs,
each captured for token counts 16, 32, 64, ... (a step replays the next count up; its padding tokens write to
the scratch block):

- `FreshGraphs`: prefills in which every sequence starts at position 0 (no cached prefix: its keys are the
  step's own), of up to `EngineConfig.prefill_graph_tokens` tokens. FlashAttention varlen over static
  cu_seqlens with the bucket's token count as the longest sequence; the padding tokens form one more sequence
  and unused sequence slots are empty (cu_seqlens repeats its end). Its grid grows with sequences x tokens, so a
  bucket of T tokens takes at most max(1, T // 16) sequences.
- `RaggedGraphs`: any other step of up to 512 tokens (prompts after a cached prefix, later chunks, mixed
  steps with decode rows): each token is a row of the paged decode kernel with its own context (its position
  + 1) and its sequence's block table (gathered on the device from one table row per sequence), which is causal
  attention over the cache once the step's keys are written. Its cost grows with the keys every row reads,
  so a step whose rows read more than `RAGGED_MAX_KEYS` in all runs without a graph.

Each graph ends at the logits of the sampled rows; the sampler runs after it, as for any step that is not a
plain decode. Deterministic mode, expert parallel and float32 weights (FlashAttention has no float32 kernel)
never use these graphs.

Legend: T tokens of the bucket, R sampled rows, B sequences, M max blocks per sequence, V vocab.
"""

import itertools

import torch

from leagues.engine.attention import PagedAttention
from leagues.engine.scheduler import ScheduledBatch
from leagues.model.attention import varlen_function

_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RAGGED_MAX_TOKENS = 512
RAGGED_MAX_KEYS = 1 << 20
"""Keys read by all rows of a ragged step together (the sum of their contexts), at most."""


def supported(runner) -> bool:
    """FlashAttention varlen serves the fresh graphs' attention: CUDA, 16-bit weights, the default kernels."""
    dtype = runner.model.embed.weight.dtype
    flash_dtype = dtype in (torch.float16, torch.bfloat16)
    on_cuda = runner.device.type == "cuda" and runner.attention_impl != "reference"
    return on_cuda and flash_dtype and varlen_function() is not None


def fresh_seqs(tokens: int) -> int:
    """Sequence slots of a fresh bucket of `tokens` tokens."""
    return max(1, tokens // 16)


class _StepGraphs:
    """Graphs of one kind over one persistent input buffer: a pinned host copy filled in place, moved by one copy
    (a step reads its samples back before the next one fills it again, so one host copy is enough)."""

    def __init__(self, runner, buckets: list[int], fields: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.runner, self.buckets = runner, buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.replays = 0
        """Steps that ran as one of these graphs."""
        self.layout, offset = {}, 0
        for name, (dtype, shape) in fields.items():
            self.layout[name] = (offset, dtype, shape)
            offset += -(-torch.Size(shape).numel() * dtype.itemsize // 8) * 8
        device = runner.device
        self.host_bytes = torch.zeros(offset, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_bytes = torch.zeros(offset, dtype=torch.uint8, device=device)
        self.host, self.device = self._views(self.host_bytes), self._views(self.device_bytes)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for name, (offset, dtype, shape) in self.layout.items():
            views[name] = buffer[offset : offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
        return views

    def upload(self, end: int | None = None) -> None:
        """The host copy to the device (its first `end` bytes: the fields after them are unused this step)."""
        self.device_bytes[:end].copy_(self.host_bytes[:end], non_blocking=True)

    def replay(self, bucket: int, num_rows: int) -> torch.Tensor:
        graph, outputs = self.graphs[bucket]
        graph.replay()
        self.replays += 1
        return outputs["logits"][:num_rows].float()

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """A graph for every bucket, largest first (later ones reuse its memory in the shared pool)."""
        self.graphs.clear()
        for bucket in sorted(self.buckets, reverse=True):
            self.fill_padding(bucket)
            self.upload()
            self.step(bucket)  # compile, warm up kernels and autotuning outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = self.step(bucket)
            self.graphs[bucket] = (graph, outputs)

    def clear(self) -> None:
        self.graphs.clear()

    def fill_tokens(self, ids: list[int], positions: list[int], slots: list[int], sample_rows: list[int]) -> None:
        """The step's tokens and sampled rows into the host copy (after `fill_padding`)."""
        host, tokens = self.host, len(ids)
        host["input_ids"][:tokens] = torch.tensor(ids)
        host["positions"][:tokens] = torch.tensor(positions)
        host["slots"][:tokens] = torch.tensor(slots)
        host["sample_rows"][: len(sample_rows)] = torch.tensor(sample_rows, dtype=torch.int64)

    def fill_padding(self, bucket: int) -> None:
        raise NotImplementedError

    def step(self, bucket: int) -> dict:
        raise NotImplementedError


def _token_fields(tokens: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The per-token inputs every kind of step graph has: ids, positions and cache slots."""
    return {name: (torch.int64, (tokens,)) for name in ("input_ids", "positions", "slots")}


def _rows(batch: ScheduledBatch, block_size: int):
    """Per token of the step: id, position, cache slot; and per sequence its token count and whether it samples."""
    ids, positions, slots = [], [], []
    for item in batch.items:
        seq, start = item.seq, item.seq.num_computed_tokens
        table = seq.block_table
        ids.extend(seq.token_ids[start : start + item.num_new_tokens])
        span = range(start, start + item.num_new_tokens)
        positions.extend(span)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
    ends = list(itertools.accumulate(item.num_new_tokens for item in batch.items))
    sample_rows = [end - 1 for end, item in zip(ends, batch.items, strict=True) if item.samples]
    return ids, positions, slots, ends, sample_rows


class FreshGraphs(_StepGraphs):
    def __init__(self, runner, max_tokens: int) -> None:
        buckets = [t for t in _BUCKETS if t <= max_tokens]
        most = buckets[-1] if buckets else 0
        super().__init__(
            runner,
            buckets,
            _token_fields(most)
            | {
                "sample_rows": (torch.int64, (fresh_seqs(most),)),
                "cu_seqlens": (torch.int32, (fresh_seqs(most) + 2,)),
            },
        )
        self.attention: dict[int, PagedAttention] = {}

    def bucket(self, batch: ScheduledBatch) -> int | None:
        """The captured bucket that runs `batch`, or None (not a fresh prefill, or too large)."""
        if not self.graphs or batch.is_decode or any(item.seq.num_computed_tokens for item in batch.items):
            return None
        tokens, seqs = batch.num_tokens, len(batch.items)
        return next((t for t in self.buckets if t >= tokens and fresh_seqs(t) >= seqs and t in self.graphs), None)

    def run(self, batch: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [R, V] of the rows that sample this step, in batch order (as `ModelRunner.execute`)."""
        ids, positions, slots, ends, sample_rows = _rows(batch, self.runner.block_size)
        host = self.host
        self.fill_padding(bucket)
        self.fill_tokens(ids, positions, slots, sample_rows)
        host["cu_seqlens"][1 : len(ends) + 1] = torch.tensor(ends, dtype=torch.int32)
        host["cu_seqlens"][len(ends) + 1 : fresh_seqs(bucket) + 2] = bucket  # the padding's sequence, then empty ones
        self.upload()
        return self.replay(bucket, len(sample_rows))

    def fill_padding(self, bucket: int) -> None:
        """Every token of the bucket as padding: position 0, the scratch block's first slot, one sequence."""
        host, runner = self.host, self.runner
        host["input_ids"][:bucket] = 0
        host["positions"][:bucket] = 0
        host["slots"][:bucket] = runner.num_blocks * runner.block_size
        host["sample_rows"].zero_()
        host["cu_seqlens"][0] = 0
        host["cu_seqlens"][1 : fresh_seqs(bucket) + 2] = bucket

    def step(self, bucket: int) -> dict:
        runner, dev = self.runner, self.device
        if bucket not in self.attention:
            seqs = fresh_seqs(bucket) + 1
            self.attention[bucket] = PagedAttention(
                kv_cache_2LNSGA=runner.kv_cache,
                slots_T=dev["slots"][:bucket],
                block_tables_BM=torch.zeros(seqs, 1, dtype=torch.int32, device=runner.device),  # fresh: unread
                context_lens_B=torch.zeros(seqs, dtype=torch.int32, device=runner.device),
                cu_seqlens_q_B1=dev["cu_seqlens"][: seqs + 1],
                max_q=bucket,
                max_k=bucket,
                is_decode=False,
                fresh=True,
                impl=runner.attention_impl,
            )
        hidden_TD = runner._run(self.attention[bucket], dev["input_ids"][:bucket], dev["positions"][:bucket])
        return {"logits": runner.model.logits(hidden_TD[dev["sample_rows"][: fresh_seqs(bucket)]])}

    def clear(self) -> None:
        self.graphs.clear()
        self.attention.clear()


class RaggedGraphs(_StepGraphs):
    def __init__(self, runner, max_tokens: int, max_seqs: int) -> None:
        buckets = [t for t in _BUCKETS if t <= min(max_tokens, RAGGED_MAX_TOKENS)]
        most = buckets[-1] if buckets else 0
        self.max_seqs = min(max_seqs, most)
        # the block tables come last, so a step's copy stops after the sequences it has (row 0: the scratch row)
        super().__init__(
            runner,
            buckets,
            _token_fields(most)
            | {
                "table_rows": (torch.int64, (most,)),
                "sample_rows": (torch.int64, (self.max_seqs,)),
                "context_lens": (torch.int32, (most,)),
                "block_tables": (torch.int32, (self.max_seqs + 1, runner.max_blocks)),
            },
        )
        self.table_offset = self.layout["block_tables"][0]

    def bucket(self, batch: ScheduledBatch) -> int | None:
        """The captured bucket that runs `batch`, or None (a decode, too many tokens, sequences or keys)."""
        if not self.graphs or batch.is_decode or len(batch.items) > self.max_seqs:
            return None
        keys = 0
        for item in batch.items:  # the rows' contexts: start + 1 .. start + n
            start, n = item.seq.num_computed_tokens, item.num_new_tokens
            keys += n * start + n * (n + 1) // 2
        if keys > RAGGED_MAX_KEYS:
            return None
        tokens, seqs = batch.num_tokens, len(batch.items)
        return next(
            (t for t in self.buckets if t >= tokens and min(t, self.max_seqs) >= seqs and t in self.graphs), None
        )

    def run(self, batch: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [R, V] of the rows that sample this step, in batch order (as `ModelRunner.execute`)."""
        ids, positions, slots, ends, sample_rows = _rows(batch, self.runner.block_size)
        host, tokens, seqs = self.host, len(ids), len(batch.items)
        self.fill_padding(bucket)
        self.fill_tokens(ids, positions, slots, sample_rows)
        host["context_lens"][:tokens] = torch.tensor(positions, dtype=torch.int32) + 1
        counts = [item.num_new_tokens for item in batch.items]
        host["table_rows"][:tokens] = torch.repeat_interleave(torch.arange(1, seqs + 1), torch.tensor(counts))
        width = max(len(item.seq.block_table) for item in batch.items)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch.items]
        host["block_tables"][1 : seqs + 1, :width] = torch.tensor(tables, dtype=torch.int32)
        self.upload(self.table_offset + (seqs + 1) * self.runner.max_blocks * 4)
        return self.replay(bucket, len(sample_rows))

    def fill_padding(self, bucket: int) -> None:
        """Every row of the bucket as padding: one key (itself) in the scratch block, through the scratch table row."""
        host, runner = self.host, self.runner
        host["input_ids"][:bucket] = 0
        host["positions"][:bucket] = 0
        host["context_lens"][:bucket] = 1
        host["slots"][:bucket] = runner.num_blocks * runner.block_size
        host["table_rows"][:bucket] = 0
        host["sample_rows"].zero_()
        host["block_tables"][0] = runner.num_blocks

    def step(self, bucket: int) -> dict:
        runner, dev = self.runner, self.device
        attention = PagedAttention(
            kv_cache_2LNSGA=runner.kv_cache,
            slots_T=dev["slots"][:bucket],
            block_tables_BM=dev["block_tables"][dev["table_rows"][:bucket]],  # a table row per token, in the graph
            context_lens_B=dev["context_lens"][:bucket],
            cu_seqlens_q_B1=torch.arange(bucket + 1, dtype=torch.int32, device=runner.device),
            max_q=1,
            max_k=runner.max_blocks * runner.block_size,
            is_decode=True,
            fresh=False,
            impl=runner.attention_impl,
            rows_are_sequences=False,
        )
        hidden_TD = runner._run(attention, dev["input_ids"][:bucket], dev["positions"][:bucket])
        logits = runner.model.logits(hidden_TD[dev["sample_rows"][: min(bucket, self.max_seqs)]])
        return {"logits": logits, "attention": attention}  # the graph reads the attention's tensors: keep them
