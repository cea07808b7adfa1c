"""Which instance gets a request: round_robin, least_loaded (the instances' queue gauges and the router's own
in-flight count) and cache_aware (SGLang's router rule: send a prompt where its prefix was sent before, unless
the load is out of balance).

cache_aware keeps, per instance, an approximate prefix tree of the prompts routed there: the chained hashes of
their leading `chunk_chars`-character chunks in an LRU map (the router has no tokenizer, and a chain of hashes
is a tree keyed by path). A prompt's match on an instance is the number of its leading chunks found there. An
instance that restarted (Instance.restarts, counted by the health polls) starts from an empty tree."""
from __future__ import annotations

import itertools
from collections import OrderedDict

from frontierlm.router.instances import Instance

from frontierlm.router.args import POLICIES  # noqa: F401 (one list for the flag and the code)


def chunk_hashes(text: str, chunk_chars: int) -> list[int]:
    out, parent = [], 0
    for i in range(0, len(text) - chunk_chars + 1, chunk_chars):
        parent = hash((parent, text[i:i + chunk_chars]))
        out.append(parent)
    return out


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._counter = itertools.count()

    def choose(self, candidates: list[Instance], prompt: str) -> Instance:
        return candidates[next(self._counter) % len(candidates)]

    def on_routed(self, inst: Instance, prompt: str) -> None:
        pass


class LeastLoaded(RoundRobin):
    name = "least_loaded"

    def choose(self, candidates: list[Instance], prompt: str) -> Instance:
        # ties (an idle fleet) rotate, so equal instances share the work
        start = next(self._counter) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda i: (i.load(), i.kv_usage))


class CacheAware(LeastLoaded):
    name = "cache_aware"

    def __init__(self, chunk_chars: int = 32, cache_threshold: float = 0.5, balance_abs: float = 8,
                 balance_rel: float = 1.5, max_entries: int = 200_000):
        super().__init__()
        self.chunk_chars, self.cache_threshold = chunk_chars, cache_threshold
        self.balance_abs, self.balance_rel, self.max_entries = balance_abs, balance_rel, max_entries
        self.trees: dict[str, tuple[int, OrderedDict]] = {}  # url -> (its restarts when built, tree)

    def tree(self, inst: Instance, create: bool = False) -> OrderedDict | None:
        """The instance's tree; one built before its last restart is dropped (a new process caches nothing)."""
        entry = self.trees.get(inst.url)
        if entry is not None and entry[0] != inst.restarts:
            del self.trees[inst.url]
            entry = None
        if entry is None and create:
            entry = self.trees[inst.url] = (inst.restarts, OrderedDict())
        return entry[1] if entry is not None else None

    def match(self, inst: Instance, hashes: list[int]) -> int:
        tree = self.tree(inst)
        n = 0
        while tree is not None and n < len(hashes) and hashes[n] in tree:
            n += 1
        return n

    def choose(self, candidates: list[Instance], prompt: str) -> Instance:
        loads = [i.load() for i in candidates]
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            return super().choose(candidates, prompt)  # out of balance: the cache does not matter now
        hashes = chunk_hashes(prompt, self.chunk_chars)
        if hashes:
            best = max(candidates, key=lambda i: (self.match(i, hashes), -i.load()))
            if self.match(best, hashes) / len(hashes) >= self.cache_threshold:
                return best
        # no instance holds enough of it: the least loaded, then the one whose cache holds least
        return min(candidates, key=lambda i: (i.load(), len(self.tree(i) or ())))

    def on_routed(self, inst: Instance, prompt: str) -> None:
        tree = self.tree(inst, create=True)
        for h in chunk_hashes(prompt, self.chunk_chars):
            tree[h] = None
            tree.move_to_end(h)
        while len(tree) > self.max_entries:
            tree.popitem(last=False)


def make_policy(name: str):
    policies = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "cache_aware": CacheAware}
    if name not in policies:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return policies[name]()
