"""Where inductor keeps what it compiled (graphs, C++ kernels, autotune choices) between runs, and whether a
compile found its graphs there (warm) or had to build them (cold)."""
from __future__ import annotations

import os

# inductor's counters of its FX-graph cache: a hit loads a compiled graph, a miss builds one (and stores it)
_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")


def use_persistent_inductor_cache() -> str:
    """Point inductor at a cache that outlives the process and the machine's /tmp cleanup, and return it:
    TORCHINDUCTOR_CACHE_DIR when set (the operator's choice wins), else $XDG_CACHE_HOME/frontierlm/inductor
    (~/.cache/frontierlm/inductor). Must run before the first compile of the process: inductor reads the
    variable when it first resolves its cache directory."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "frontierlm", "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.makedirs(path, exist_ok=True)
    return path


def _read() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: counters["inductor"][k] for k in _COUNTERS}


class CacheProbe:
    """Counts inductor's graph-cache hits and misses from its creation on (the counters are process-wide)."""

    def __init__(self):
        self._start = _read()

    def verdict(self) -> str:
        now = _read()
        hit, miss, bypass = (now[k] - self._start[k] for k in _COUNTERS)
        total = hit + miss + bypass
        if total == 0:
            return "no new graph"
        if hit == total:
            return "warm"
        if hit == 0:
            return "cold" if bypass == 0 else f"cold ({bypass} of {total} graphs not cacheable)"
        return f"partly warm ({hit} of {total} graphs from the cache)"
