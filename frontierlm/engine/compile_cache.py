"""Where inductor keeps what it compiles (C++ kernels, wrapper code, autotune choices) between runs, and whether a
compile found everything there (warm) or had to build some of it (cold).

Why count files rather than read inductor's cache counters: with freezing on (the CPU decode graphs) inductor
never caches whole graphs ("mkldnn tensors unpickleable", AOTAutograd: "cannot cache a graph with freezing"),
so its graph-cache counters say "bypass" every time; what a warm cache saves is the C++ compiles and the
autotune benchmarks, stored as files keyed by their source. A compile that adds none found them all (each
process still writes its graph's Python wrapper afresh, a .py file that costs nothing to build: not counted)."""
from __future__ import annotations

import os


def use_persistent_inductor_cache() -> str:
    """Point inductor at a cache that outlives the process and the machine's /tmp cleanup, and return it:
    TORCHINDUCTOR_CACHE_DIR when the operator set it, else $XDG_CACHE_HOME/frontierlm/inductor
    (~/.cache/frontierlm/inductor). Torch writes its own default (/tmp/torchinductor_USER) into the variable
    the first time it resolves the directory, so that value counts as unset. Inductor reads the variable on
    every lookup, so this takes effect for every later compile of the process."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path or os.path.abspath(path) == os.path.abspath(default_cache_dir()):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "frontierlm", "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.makedirs(path, exist_ok=True)
    return path


def _files(root: str) -> int:
    return sum(sum(not n.endswith(".py") for n in names) for _, _, names in os.walk(root))


class CacheProbe:
    """Counts the files a compile adds to the inductor cache directory from its creation on."""

    def __init__(self, root: str):
        self.root = root
        self._before = _files(root)

    def verdict(self) -> str:
        added = _files(self.root) - self._before
        if added <= 0:
            return "warm"
        return f"cold, {added} files added" if self._before == 0 else f"cold or partly warm, {added} files added"
