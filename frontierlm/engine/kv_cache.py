"""Paged KV-cache bookkeeping: a block pool with refcounts, an LRU free list and a hash -> block map for
prefix caching, and the KVCacheManager facade the scheduler talks to. No tensors live here; the model runner
owns the cache tensors and this module hands out block ids."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from frontierlm.engine.request import Request

# A block's identity for prefix caching: (parent hash, this block's tokens, extra keys).
BlockKey = tuple


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the cache
    key: BlockKey | None = None  # kept to verify a hash hit token by token


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra_keys: tuple = ()) -> tuple[int, BlockKey]:
    key = (parent_hash, token_ids, extra_keys)
    return hash(key), key


class BlockPool:
    """Fixed set of blocks. Free blocks sit in LRU order (evict from the front); a freed block keeps its hash
    and goes to the back, so a later request with the same prefix can revive it."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}
        self.enable_caching = enable_caching

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int, key: BlockKey) -> Block | None:
        block = self.cached.get(block_hash)
        return block if block is not None and block.key == key else None

    def allocate(self, n: int) -> list[Block]:
        assert n <= len(self.free_queue), "caller must check capacity first"
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cache-hit blocks, reviving those that were free."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        # Callers pass a request's blocks tail-first so the tail of a sequence is evicted before its prefix.
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def register(self, block: Block, block_hash: int, key: BlockKey) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:  # same content already cached elsewhere: keep the first copy
            return
        block.block_hash, block.key = block_hash, key
        self.cached[block_hash] = block

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = block.key = None

    def reset_prefix_cache(self) -> None:
        for block in list(self.free_queue.values()):
            self._evict(block)


class KVCacheManager:
    """Per-request block tables on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_num_registered: dict[str, int] = {}  # leading blocks already registered in the cache
        self.prefix_queries = 0  # tokens looked up / hit by admitted requests, for metrics
        self.prefix_hits = 0

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _block_keys(self, request: Request, upto_blocks: int) -> list[tuple[int, BlockKey]]:
        """Chained hashes of the request's full blocks, extended to at least `upto_blocks` (memoized on the
        request: its tokens only ever grow, so earlier hashes stay valid, also across preemption)."""
        keys, bs = request.block_keys, self.block_size
        while len(keys) < upto_blocks:
            i = len(keys)
            parent = keys[-1][0] if keys else None
            keys.append(hash_block(parent, tuple(request.all_token_ids[i * bs:(i + 1) * bs])))
        return keys

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of full blocks, capped so the last token is always computed. Requests asking
        for prompt_logprobs compute every position (cached ones would have no logits)."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for block_hash, key in self._block_keys(request, max_blocks)[:max_blocks]:
            block = self.pool.lookup(block_hash, key)
            if block is None:
                break
            hit.append(block)
        return hit, len(hit) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[Block] | None = None) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after the request's computed ones (plus any cache-hit
        blocks). Returns the request's block ids, or None (nothing changed) if the pool cannot supply them."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens
        need = -(-total_tokens // self.block_size) - len(blocks) - len(computed_blocks)
        revive = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # hits that currently sit in the free list
        if need + revive > self.pool.num_free_blocks:
            return None
        self.pool.touch(computed_blocks)
        blocks = self.req_blocks.setdefault(request.request_id, blocks)
        blocks.extend(computed_blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        self._cache_full_blocks(request, blocks, total_tokens)
        return [b.block_id for b in blocks]

    def _cache_full_blocks(self, request: Request, blocks: list[Block], num_tokens: int) -> None:
        # Register blocks that will be full once this step's tokens are written. Their K/V is written in the
        # same forward, before any attention reads it, so a request scheduled later in this step may share them.
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.req_num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        keys = self._block_keys(request, num_full)
        for i in range(start, num_full):
            self.pool.register(blocks[i], *keys[i])
        self.req_num_registered[request.request_id] = num_full

    def free_tail(self, request_id: str, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (speculative positions that were rejected).
        Such blocks were never registered: only blocks full of a request's own tokens are hashed."""
        blocks = self.req_blocks.get(request_id)
        keep = -(-num_tokens // self.block_size)
        if blocks is None or len(blocks) <= keep:
            return
        tail = blocks[keep:]
        del blocks[keep:]
        self.pool.free(list(reversed(tail)))

    # ---- KV transfer (frontierlm/kv_transfer) ----------------------------------------------------------
    def allocate_external(self, request: Request, computed_blocks: list[Block], num_tokens: int) -> bool:
        """Blocks for the request's first `num_tokens` tokens: the cache hits, then fresh blocks that another
        instance will fill. The fresh ones are hashed only once filled (when the request is next scheduled)."""
        need = -(-num_tokens // self.block_size) - len(computed_blocks)
        revive = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need + revive > self.pool.num_free_blocks or request.request_id in self.req_blocks:
            return False
        self.pool.touch(computed_blocks)
        self.req_blocks[request.request_id] = computed_blocks + self.pool.allocate(need)
        return True

    def detach(self, request: Request) -> list[Block]:
        """Take over a finishing request's block references (a producer holds them until they are sent)."""
        self.req_num_registered.pop(request.request_id, None)
        return self.req_blocks.pop(request.request_id, [])

    def free_blocks(self, blocks: list[Block]) -> None:
        self.pool.free(list(reversed(blocks)))

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_num_registered.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))
