"""The KV block pool: allocation, reference counts, and the content-addressed prefix cache.

Plain Python: the tensors live in the runner; this only hands out block ids.
Block 0 is a null block that is never allocated, so padded gathers read zeros.

A full block's identity is hash(parent block's hash, its token ids, extra keys).
Freed blocks keep their hash and sit in an LRU free list, so a later request with
the same prefix takes them back; they are evicted only when the pool needs them.
A freed block that caches nothing goes to the front of that list instead: the next
allocation reuses it while its memory is warm, rather than a never-touched block
(on CPU each first touch of a page faults; BENCHMARKS.md has what that cost in a W1 run).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ember.engine.request import Request

NULL_BLOCK = 0


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks: {num_blocks} is too small (need at least 2)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks in the order they are taken: emptied blocks (most recent first), then
        # never-used ones, then cached ones, least recently used first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- capacity -------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------
    def _update_block_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.all_token_ids[i * bs:(i + 1) * bs], request.cache_salt))

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (at least one token is left to compute)."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        self._update_block_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """The chain hashes of the full blocks of `token_ids` (no salt, no adapter), as a request's would be."""
        bs, hashes = self.block_size, []
        for i in range(len(token_ids) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def num_cached_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` the cache holds now. Only dict lookups: safe to call from another
        thread than the engine's (the answer may be a step old, which routing tolerates)."""
        if not self.enable_prefix_caching:
            return 0
        count = 0
        for block_hash in hashes:
            if block_hash not in self.cached:
                break
            count += 1
        return count

    def record_query(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup; a preempted request's recompute is not a new query."""
        if self.enable_prefix_caching and request.num_preemptions == 0 and request.params.prompt_logprobs is None:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def reset_prefix_cache(self) -> None:
        """Forget every block's content (e.g. after the weights changed)."""
        emptied = [b for b in self.free_blocks if self.hash_of[b] is not None]  # least recently used first
        for block in emptied:
            self.free_blocks.move_to_end(block, last=False)  # the most recently used ends up first
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks

    # ---- allocation ---------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = (),
                       num_lookahead: int = 0) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones
        (plus `num_lookahead` slots a draft model writes ahead).

        `computed_blocks` (from `get_computed_blocks`, at admission) are shared, not copied.
        Returns False, changing nothing, when the pool is short.
        """
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_for(num_total + num_lookahead) - len(request.block_ids) - len(computed_blocks)
        # Cached hits with no other user sit in the free list; taking them shrinks it.
        num_revived = sum(1 for b in computed_blocks if self.ref_cnt[b] == 0)
        if num_new_blocks > self.num_free_blocks - num_revived:
            return False
        for block in computed_blocks:
            if self.ref_cnt[block] == 0:
                del self.free_blocks[block]
            self.ref_cnt[block] += 1
        request.block_ids.extend(computed_blocks)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._take_free_block())
        if self.enable_prefix_caching:
            # Only tokens known for sure: speculative drafts may still be rejected.
            self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        self._uncache(block)
        self.ref_cnt[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        block_hash = self.hash_of[block]
        if block_hash is not None:
            if self.cached.get(block_hash) == block:
                del self.cached[block_hash]
            self.hash_of[block] = None

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        # Registered as soon as scheduled: within a step every layer writes all new
        # K/V before any attention reads, so a request admitted later in the same
        # step can already share them.
        self._update_block_hashes(request, num_tokens)
        for i in range(request.num_registered_blocks, num_tokens // self.block_size):
            block, block_hash = request.block_ids[i], request.block_hashes[i]
            if self.hash_of[block] is None and block_hash not in self.cached:
                self.cached[block_hash] = block
                self.hash_of[block] = block_hash
        request.num_registered_blocks = max(request.num_registered_blocks, num_tokens // self.block_size)

    def free(self, request: Request) -> None:
        """Return a request's blocks; full computed blocks stay cached until evicted."""
        num_valid_blocks = request.num_computed_tokens // self.block_size
        # Tail first, so a prefix's head blocks are evicted last.
        for i in range(len(request.block_ids) - 1, -1, -1):
            block = request.block_ids[i]
            self.ref_cnt[block] -= 1
            if self.ref_cnt[block] == 0:
                if i >= num_valid_blocks:  # registered but never computed
                    self._uncache(block)
                self.free_blocks[block] = None
                if self.hash_of[block] is None:  # caches nothing: reuse it first
                    self.free_blocks.move_to_end(block, last=False)
        request.block_ids = []
        request.num_registered_blocks = 0

    def check_invariants(self, live_requests: Sequence[Request] = ()) -> None:
        """Consistency of the pool (tests call this after every step)."""
        refs = [0] * self.num_blocks
        for request in live_requests:
            for block in request.block_ids:
                refs[block] += 1
        assert refs == self.ref_cnt, "reference counts disagree with live requests' block tables"
        assert NULL_BLOCK not in self.free_blocks and self.ref_cnt[NULL_BLOCK] == 0
        for block in range(1, self.num_blocks):
            in_free = block in self.free_blocks
            assert in_free == (self.ref_cnt[block] == 0), f"block {block}: free={in_free} ref={self.ref_cnt[block]}"
        for block_hash, block in self.cached.items():
            assert self.hash_of[block] == block_hash
