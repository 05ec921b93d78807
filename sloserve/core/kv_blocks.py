"""KV block accounting over a fixed pool, with prefix caching by block-content hash.

A full block is identified by the hash of its tokens chained with its predecessor's hash, so
equal hashes mean an equal prefix up to and including that block. A freed block keeps its hash
and stays findable until the pool hands it out again (least recently freed first), so a later
request with the same prefix can take it back without recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sloserve.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(prev_hash: int | None, tokens: list[int]) -> int:
    return hash((prev_hash, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order; a cached free block can still be revived by a hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # Without prefix caching no block is ever shared or revived: a plain stack of free
        # ids, moved in bulk, does (the simulator allocates millions of blocks).
        self._stack: list[int] | None = None if enable_prefix_caching else list(
            range(num_blocks - 1, -1, -1))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its full blocks

    # ---- usage figures -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) if self._stack is None else len(self._stack)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission: prefix lookup + fresh blocks ------------------------------------------
    def _prefix_hits(self, request: Request) -> list[int]:
        """Cached blocks that hold a prefix of the request's tokens, never its last token
        (that one must be computed to produce logits)."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        hits: list[int] = []
        prev: int | None = None
        for start in range(0, (len(tokens) - 1) // self.block_size * self.block_size,
                           self.block_size):
            prev = chain_hash(prev, tokens[start:start + self.block_size])
            block_id = self._cached.get(prev)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_cached_tokens(self, request: Request) -> int:
        """Tokens of the request's prefix that the cache holds now. No side effects."""
        return len(self._prefix_hits(request)) * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Could a request holding no blocks be admitted to compute `num_new_tokens` tokens
        beyond its cached prefix? No side effects."""
        hits = self._prefix_hits(request)
        cached_tokens = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, request.num_tokens - cached_tokens)
        fresh = self.blocks_for(cached_tokens + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return fresh + revived <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> int:
        """Give a new (or recomputing) request its prefix hits and fresh blocks for
        `num_new_tokens` more tokens. Returns how many tokens came from the cache."""
        assert not request.block_ids, f"{request.request_id} already holds blocks"
        hits = self._prefix_hits(request)
        for block_id in hits:
            self._revive(block_id)
        request.block_ids = list(hits)
        cached_tokens = len(hits) * self.block_size
        request.num_computed_tokens = cached_tokens
        request.num_cached_tokens = cached_tokens
        self._hashes[request.request_id] = [self.blocks[b].block_hash for b in hits]
        num_new_tokens = min(num_new_tokens, request.num_tokens - cached_tokens)
        self.append(request, num_new_tokens)
        return cached_tokens

    # ---- growth: decode steps and later prefill chunks ------------------------------------
    def _missing_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(request.block_ids))

    def can_append(self, request: Request, num_new_tokens: int = 1) -> bool:
        return self._missing_blocks(request, num_new_tokens) <= self.num_free_blocks

    def append(self, request: Request, num_new_tokens: int = 1) -> None:
        missing = self._missing_blocks(request, num_new_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks for {request.request_id}")
        if self._stack is not None:
            if missing:
                request.block_ids.extend(self._stack[-missing:])
                del self._stack[-missing:]
            return
        free, blocks, ids = self._free, self.blocks, request.block_ids
        for _ in range(missing):  # hot: a long prompt takes hundreds of blocks at once
            block_id = free.popitem(last=False)[0]
            block = blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            ids.append(block_id)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks whose tokens are now all computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(request.request_id, [])
        num_full = request.num_computed_tokens // self.block_size
        if len(hashes) >= num_full:
            return
        tokens = request.all_token_ids
        prev = hashes[-1] if hashes else None
        for index in range(len(hashes), num_full):
            start = index * self.block_size
            prev = chain_hash(prev, tokens[start:start + self.block_size])
            hashes.append(prev)
            block = self.blocks[request.block_ids[index]]
            if block.block_hash is None and prev not in self._cached:
                block.block_hash = prev
                self._cached[prev] = block.block_id

    # ---- release -----------------------------------------------------------------------
    def free(self, request: Request) -> None:
        if self._stack is not None:
            self._stack.extend(reversed(request.block_ids))
            request.block_ids = []
            return
        # Free the tail first so the shared prefix is the last to be evicted.
        free, blocks = self._free, self.blocks
        for block_id in reversed(request.block_ids):
            block = blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                free[block_id] = None
            elif block.ref_count < 0:
                raise AssertionError(f"double free of block {block_id}")
        request.block_ids = []
        self._hashes.pop(request.request_id, None)

    def _revive(self, block_id: int) -> None:
        """Hold a prefix-hit block, taking it off the free list if nobody held it."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block: Block) -> None:
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
