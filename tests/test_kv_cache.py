import random

from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.engine.request import Request
from frontierlm.sampling_params import SamplingParams


def make_request(rid, tokens, max_tokens=8, priority=0, arrival=0.0):
    return Request(str(rid), list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens, (), priority, arrival)


def test_allocate_and_free_returns_all_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = make_request("a", range(10))
    ids = kv.allocate_slots(r, 10)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert kv.pool.num_free_blocks == 7
    kv.free(r)
    assert kv.pool.num_free_blocks == 10
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_allocation_fails_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = make_request("a", range(8)), make_request("b", range(100, 108))
    assert kv.allocate_slots(a, 8) is not None
    assert kv.allocate_slots(b, 8) is None
    assert kv.pool.num_free_blocks == 1 and "b" not in kv.req_blocks


def test_prefix_hit_full_blocks_only_and_capped_below_prompt_length():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = make_request("a", range(12))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    # same 12-token prompt: only 2 blocks may hit so that the last token is recomputed for logits
    b = make_request("b", range(12))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == kv.block_ids("a")[:2]
    # a longer prompt sharing 10 tokens hits the 2 full shared blocks
    c = make_request("c", list(range(10)) + [99, 98, 97, 96])
    blocks, n = kv.get_computed_blocks(c)
    assert n == 8
    # a different first block breaks the chain even if later blocks match
    d = make_request("d", [77] + list(range(1, 12)) + [5])
    assert kv.get_computed_blocks(d)[1] == 0


def test_shared_blocks_are_refcounted():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = make_request("a", range(9))
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    b = make_request("b", range(9))
    hit, n = kv.get_computed_blocks(b)
    kv.allocate_slots(b, 9 - n, hit)
    shared = kv.block_ids("a")[:2]
    assert kv.block_ids("b")[:2] == shared
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    kv.free(b)
    assert kv.pool.num_free_blocks == 20


def test_freed_blocks_revive_and_evict_in_lru_order():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", range(8))
    kv.allocate_slots(a, 8)
    kv.free(a)  # both blocks free but still cached
    assert kv.pool.num_free_blocks == 4
    b = make_request("b", list(range(8)) + [1])
    hit, n = kv.get_computed_blocks(b)
    assert n == 8  # revived from the free list
    kv.allocate_slots(b, 1, hit)
    assert kv.pool.num_free_blocks == 1
    kv.free(b)
    # freed tail-first: the tail block goes out before the prefix blocks; never-used blocks go first of all
    order = list(kv.pool.free_queue)
    assert order[-1] == kv.pool.blocks[hit[0].block_id].block_id
    c = make_request("c", range(200, 212))
    kv.allocate_slots(c, 12)  # takes 3 blocks: evicts the unused block and b's tail, keeps a prefix block
    assert kv.get_computed_blocks(make_request("d", list(range(4)) + [1]))[1] == 4


def test_hash_hit_verifies_tokens(monkeypatch):
    import frontierlm.engine.kv_cache as kvmod

    # force every block to collide on the same hash: a hit must still compare the tokens
    monkeypatch.setattr(kvmod, "hash_block", lambda parent, toks, extra=(): (42, (parent, toks, extra)))
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", range(5))
    kv.allocate_slots(a, 5)
    b = make_request("b", range(100, 105))
    assert kv.get_computed_blocks(b)[1] == 0


def test_no_leaks_under_random_operations():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    live: dict[str, Request] = {}
    prefixes = [list(range(i * 50, i * 50 + 12)) for i in range(4)]
    for step in range(3000):
        op = rng.random()
        if op < 0.35 and len(live) < 20:
            toks = rng.choice(prefixes)[: rng.randint(1, 12)] + [rng.randrange(1000) for _ in range(rng.randint(0, 9))]
            r = make_request(f"r{step}", toks)
            hit, n = kv.get_computed_blocks(r)
            if kv.allocate_slots(r, r.num_tokens - n, hit) is not None:
                r.num_computed_tokens = r.num_tokens
                live[r.request_id] = r
        elif op < 0.8 and live:
            r = live[rng.choice(list(live))]
            r.append_token(rng.randrange(1000))
            if kv.allocate_slots(r, 1) is None:
                kv.free(r)
                del live[r.request_id]
            else:
                r.num_computed_tokens += 1
        elif live:
            r = live.pop(rng.choice(list(live)))
            kv.free(r)
        # invariant: refcounts equal the number of live block tables holding each block
        counts = [0] * 64
        for rid in live:
            for bid in kv.block_ids(rid):
                counts[bid] += 1
        assert counts == [b.ref_cnt for b in kv.pool.blocks]
        assert kv.pool.num_free_blocks == sum(1 for c in counts if c == 0)
    for r in list(live.values()):
        kv.free(r)
    assert kv.pool.num_free_blocks == 64 and kv.req_blocks == {}
