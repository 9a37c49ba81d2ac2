"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, sharing and reuse.

- **Ref-counted blocks.** Forked samples of one prompt share its blocks; a write into a shared,
  partly filled block first copies it (copy-on-write): `allocate_slots` records the (src, dst) pair
  and the runner copies the block's keys, values and routes before the step runs.
- **Prefix cache.** A full block is registered under a hash chained over all tokens up to its end.
  A new sequence reuses every leading block whose hash and tokens match, whether another sequence
  holds it or it sits freed in the cache (multi-turn agents resend long shared prefixes).
- **LRU eviction.** Freed blocks keep their contents and hash and join the end of the free list;
  allocation takes from the front, so the least recently freed cached block is evicted first.
  Sequences free their blocks last-first, so a prefix's tail is evicted before its head.

The last prompt token is never served from the cache: its logits are needed to sample.
"""

from collections import OrderedDict

from leagues.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # only blocks in the prefix cache have entries: resetting costs what is cached, not the cache's size
        self.block_hash: dict[int, int] = {}
        self.block_tokens: dict[int, tuple[int, ...]] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.num_prefix_hits = self.num_prefix_queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    def _take_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        if (h := self.block_hash.pop(block_id, None)) is not None and self.hash_to_block.get(h) == block_id:
            del self.hash_to_block[h]
        self.block_tokens.pop(block_id, None)
        self.ref_counts[block_id] = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def admit(self, seq: Sequence) -> None:
        """Attach the longest cached prefix of a sequence that holds no blocks yet."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        parent = 0
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(index, self.block_size)
            parent = hash((parent, tokens))
            self.num_prefix_queries += 1
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.block_tokens.get(block_id) != tokens:
                break
            self.num_prefix_hits += 1
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(parent)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.num_output_tokens == 0:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next `num_new_tokens` of `seq` (and copy a shared block first); False if full.
        A block table only ever grows in place: a copy-on-write makes a new list (the runner's decode buffers
        rewrite a row only when its table is another list or has grown)."""
        start, table = seq.num_computed_tokens, seq.block_table
        first = start // self.block_size
        if num_new_tokens == 1 and first < len(table) and self.ref_counts[table[first]] == 1:
            return True  # a decode token in a block of its own: nothing to allocate or copy
        needed = -(-(start + num_new_tokens) // self.block_size) - len(table)
        cow = first < len(table) and self.ref_counts[table[first]] > 1
        if needed + cow > self.num_free_blocks:
            return False
        if cow:
            src = table[first]
            dst = self._take_free()
            self.ref_counts[src] -= 1
            seq.block_table = table = [*table[:first], dst, *table[first + 1 :]]
            self.pending_copies.append((src, dst))
        table.extend(self._take_free() for _ in range(needed))
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Put the sequence's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            block_id = seq.block_table[index]
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            h = hash((parent, seq.block_tokens(index, self.block_size)))
            self.block_hash[block_id] = h
            self.block_tokens[block_id] = seq.block_tokens(index, self.block_size)
            self.hash_to_block.setdefault(h, block_id)
            seq.block_hashes.append(h)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent."""
        for block_id in parent.block_table:
            self._ref(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a weight update the cached keys and values are stale)."""
        self.hash_to_block.clear()
        self.block_hash.clear()
        self.block_tokens.clear()
