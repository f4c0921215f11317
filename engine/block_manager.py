"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A block holds the K/V of `block_size` consecutive tokens of one sequence. A full block whose K/V has
been computed is registered under a chained hash of its contents (hash of the parent block's hash and
its own token ids), so a later sequence with the same prefix maps those blocks instead of recomputing
them (blocks are shared read-only: only a sequence's last, partial block is ever written). Freed blocks
keep their hash and go to the back of the free list; allocation takes from the front, so the least
recently freed cached block is the one evicted.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from porter.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set while the block is registered in the prefix cache


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        # counters (prefix-cache effectiveness)
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0
        self.num_evicted_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache -------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """seq.block_hashes extended to cover its first `num_full_blocks` blocks (pure function of tokens)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if i else None, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks. The last token is never matched: its
        hidden state is needed to sample, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's full blocks whose K/V is now computed (call after each step). Tokens still
        in flight (not in token_ids yet) are never hashed."""
        known = min(seq.num_computed_tokens, len(seq.token_ids))
        if not self.enable_prefix_caching or known // self.block_size <= seq.num_hashed_blocks:
            return  # no block filled since the last call (most decode steps)
        num_full = min(known // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self._cached:  # a twin computed elsewhere stays unhashed
                block.hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        seq.num_hashed_blocks = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence is using (benchmarks: a repeated workload must not hit
        the cache its first run filled). Returns how many blocks were dropped."""
        dropped = 0
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.hash is not None:
                del self._cached[block.hash]
                block.hash = None
                dropped += 1
        return dropped

    # --- allocation ---------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV block: check can_allocate / can_append first")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            del self._cached[block.hash]
            block.hash = None
            self.num_evicted_blocks += 1
        block.ref_count = 1
        return block_id

    def can_allocate(self, seq: Sequence) -> bool:
        """Blocks for all of seq's current tokens fit (cached blocks in use by others cost nothing)."""
        hits = self._lookup(seq)
        shared = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.num_free_blocks >= self.blocks_needed(seq.num_tokens) - shared

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its current tokens, mapping prefix-cache hits; sets num_computed_tokens."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already has blocks")
        hits = self._lookup(seq)
        self.num_queried_blocks += (seq.num_tokens - 1) // self.block_size
        self.num_hit_blocks += len(hits)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens

    def can_append(self, seq: Sequence) -> bool:
        """seq's blocks cover its tokens, or one free block can extend them (a decode adds one token)."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free_blocks >= 1

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        # tail blocks first, so they are evicted before the (more shareable) head of the prefix
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.num_synced_blocks = 0  # a new table is carried whole
