"""CUDA graphs for small fresh prefills: a prompt's first step without the host's launch overhead.

A prefill of a few hundred tokens is launch-bound: about a thousand kernels whose host work (the compiled
blocks' launches, custom operators, Triton's launcher) cost ~20 ms on an H200 where the GPU needs ~2 ms, and
every request of a server waits for one (its own, or the one running when it arrives). So fresh prefills (no
cached prefix: every sequence of the step starts at position 0, its keys are the step's own) of at most
`EngineConfig.prefill_graph_tokens` tokens replay a graph captured for the next token count up. The step's
tokens come first; the padding tokens after them form one more sequence that writes to the scratch block, and
unused sequence slots are empty (cu_seqlens repeats its end). Attention is FlashAttention varlen over the static
cu_seqlens with the bucket's token count as the longest sequence; its grid grows with sequences x tokens, so a
bucket of T tokens takes at most max(1, T // 16) sequences (a batch of more uses a larger bucket, or runs
without a graph). The graph ends at the logits of the sampled rows; the sampler runs after it, as for any
prefill. Deterministic mode, expert parallel and float32 weights (FlashAttention has no float32 kernel)
never use these graphs.

Legend: T tokens of the bucket, B sequence slots of the bucket, V vocab.
"""

import itertools

import torch

from leagues.engine.attention import PagedAttention
from leagues.engine.scheduler import ScheduledBatch
from leagues.model.attention import varlen_attn

_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def max_seqs(tokens: int) -> int:
    """Sequence slots of a bucket of `tokens` tokens."""
    return max(1, tokens // 16)


def supported(runner) -> bool:
    """FlashAttention varlen serves the graphs' attention: CUDA, 16-bit weights, the default attention kernels."""
    dtype = runner.model.embed.weight.dtype
    flash = varlen_attn is not None and dtype in (torch.float16, torch.bfloat16)
    return runner.device.type == "cuda" and flash and runner.attention_impl != "reference"


def is_fresh_prefill(batch: ScheduledBatch) -> bool:
    """A prefill step in which every sequence starts at position 0 (no cached prefix, no earlier chunk)."""
    return not batch.is_decode and all(item.seq.num_computed_tokens == 0 for item in batch.items)


class PrefillGraphs:
    def __init__(self, runner, max_tokens: int) -> None:
        """`runner`: the `ModelRunner` whose model, caches and `_run` the graphs use; buckets up to `max_tokens`."""
        self.runner = runner
        self.buckets = [t for t in _BUCKETS if t <= max_tokens]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.replays = 0
        """Prefill steps that ran as a graph."""
        most = self.buckets[-1] if self.buckets else 0
        self.fields = {
            "input_ids": (torch.int64, most),
            "positions": (torch.int64, most),
            "slots": (torch.int64, most),
            "sample_rows": (torch.int64, max_seqs(most)),
            "cu_seqlens": (torch.int32, max_seqs(most) + 2),
        }
        size = sum(-(-n * dtype.itemsize // 8) * 8 for dtype, n in self.fields.values())
        device = runner.device
        self.host_bytes = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_bytes = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host, self.device = self._views(self.host_bytes), self._views(self.device_bytes)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, (dtype, n) in self.fields.items():
            views[name] = buffer[offset : offset + n * dtype.itemsize].view(dtype)
            offset += -(-n * dtype.itemsize // 8) * 8
        return views

    def bucket(self, batch: ScheduledBatch) -> int | None:
        """The captured bucket that runs `batch`, or None (not a fresh prefill, or too large)."""
        if not self.graphs or not is_fresh_prefill(batch):
            return None
        tokens, seqs = sum(item.num_new_tokens for item in batch.items), len(batch.items)
        return next((t for t in self.buckets if t >= tokens and max_seqs(t) >= seqs and t in self.graphs), None)

    def run(self, batch: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [R, V] of the rows that sample this step, in batch order (as `ModelRunner.execute`)."""
        host, size = self.host, self.runner.block_size
        ids, slots, lens = [], [], []
        for item in batch.items:
            seq, n = item.seq, item.num_new_tokens
            ids.extend(seq.token_ids[:n])
            slots.extend(seq.block_table[p // size] * size + p % size for p in range(n))
            lens.append(n)
        tokens, ends = len(ids), list(itertools.accumulate(lens))
        sample_rows = [end - 1 for end, item in zip(ends, batch.items, strict=True) if item.samples]
        self._fill_padding(bucket)
        # one host copy is enough: a prefill step reads its samples back before the next step fills it again
        host["input_ids"][:tokens] = torch.tensor(ids)
        host["positions"][:tokens] = torch.tensor([p for n in lens for p in range(n)])
        host["slots"][:tokens] = torch.tensor(slots)
        host["sample_rows"][: len(sample_rows)] = torch.tensor(sample_rows, dtype=torch.int64)
        host["cu_seqlens"][1 : len(ends) + 1] = torch.tensor(ends, dtype=torch.int32)
        host["cu_seqlens"][len(ends) + 1 : max_seqs(bucket) + 2] = bucket  # the padding's sequence, then empty ones
        self.device_bytes.copy_(self.host_bytes, non_blocking=True)
        graph, outputs = self.graphs[bucket]
        graph.replay()
        self.replays += 1
        return outputs["logits"][: len(sample_rows)].float()

    def _fill_padding(self, bucket: int) -> None:
        """Every token of the bucket as padding: position 0, the scratch block's first slot, one sequence."""
        host, runner = self.host, self.runner
        host["input_ids"][:bucket] = 0
        host["positions"][:bucket] = 0
        host["slots"][:bucket] = runner.num_blocks * runner.block_size
        host["sample_rows"].zero_()
        host["cu_seqlens"][0] = 0
        host["cu_seqlens"][1 : max_seqs(bucket) + 2] = bucket

    def _attention(self, bucket: int) -> PagedAttention:
        runner, dev = self.runner, self.device
        seqs = max_seqs(bucket) + 1
        return PagedAttention(
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

    def _step(self, bucket: int, attention: PagedAttention) -> dict:
        dev, runner = self.device, self.runner
        hidden_TD = runner._run(attention, dev["input_ids"][:bucket], dev["positions"][:bucket])
        return {"logits": runner.model.logits(hidden_TD[dev["sample_rows"][: max_seqs(bucket)]])}

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """A graph for every bucket, largest first (later ones reuse its memory in the shared pool)."""
        self.graphs.clear()
        for bucket in sorted(self.buckets, reverse=True):
            self._fill_padding(bucket)
            self.device_bytes.copy_(self.host_bytes)
            attention = self._attention(bucket)
            self._step(bucket, attention)  # compile, warm up kernels and autotuning outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = self._step(bucket, attention)
            self.graphs[bucket] = (graph, outputs | {"attention": attention})

    def clear(self) -> None:
        self.graphs.clear()
