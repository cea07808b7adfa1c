"""Keyword checks for the vLLM-shaped entry points: an unknown or not-yet-supported keyword is a ValueError that
says so (Python's own TypeError would name neither what is supported nor what to do instead)."""
from __future__ import annotations

import difflib
import functools
from dataclasses import MISSING, fields
from typing import Iterable

# vLLM options FrontierLM knows by name but does not implement yet: passing them (other than at their neutral
# value) raises "not supported yet" instead of being silently ignored.
UNSUPPORTED_ENGINE_ARGS = {
    "pipeline_parallel_size": 1, "data_parallel_size": 1,
    "enable_lora": False, "cpu_offload_gb": 0, "tokenizer_mode": "auto",
    "swap_space": 4,  # vLLM's default; preemption here recomputes, nothing is swapped to the CPU
    "enable_expert_parallel": False, "revision": None, "tokenizer_revision": None, "download_dir": None,
    "hf_token": None, "distributed_executor_backend": None, "lora_request": None,
}
UNSUPPORTED_SAMPLING_ARGS = {"best_of": None, "use_beam_search": False, "length_penalty": None,
                             "early_stopping": None, "logits_processors": None, "flat_logprobs": False}
_HINTS = {
    "logits_processors": "pass logits processor classes to LLM(..., logits_processors=[...]) and per-request "
                         "arguments through SamplingParams(extra_args={...})",
    "use_beam_search": "call LLM.beam_search(prompts, BeamSearchParams(...)) instead",
    "length_penalty": "it belongs to BeamSearchParams (LLM.beam_search)",
    "best_of": "use n= and pick by cumulative_logprob (logprobs=0)",
}


def check_kwargs(where: str, kwargs: dict, known: Iterable[str], unsupported: dict | None = None) -> None:
    """Raise ValueError for keywords `where` does not take: 'not supported yet' for known vLLM options set to
    something other than their neutral value, 'unknown argument' (with a close match) for the rest."""
    known = set(known)
    for name, value in kwargs.items():
        if name in known:
            continue
        if unsupported is not None and name in unsupported:
            if value == unsupported[name]:
                continue  # the neutral value asks for nothing
            hint = _HINTS.get(name)
            raise ValueError(f"{where}: {name}={value!r} is not supported yet" + (f"; {hint}" if hint else ""))
        close = difflib.get_close_matches(name, sorted(known), n=1)
        raise ValueError(f"{where} got an unknown argument {name!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; it takes: {', '.join(sorted(known))}")


def strict_dataclass_init(cls, unsupported: dict | None = None):
    """Wrap a dataclass __init__ so unknown keywords raise ValueError (and neutral-valued vLLM options that we
    do not implement are dropped) instead of TypeError."""
    original = cls.__init__
    names = [f.name for f in fields(cls) if f.init]
    required = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise ValueError(f"{cls.__name__} takes at most {len(names)} positional arguments, got {len(args)}")
        extra = {k: v for k, v in kwargs.items() if k not in names}
        if extra:
            check_kwargs(cls.__name__, extra, names, unsupported)
            kwargs = {k: v for k, v in kwargs.items() if k in names}
        given = set(names[:len(args)])
        twice = sorted(given & set(kwargs))
        if twice:
            raise ValueError(f"{cls.__name__}: {', '.join(twice)} given both by position and by name")
        missing = [n for n in required if n not in given and n not in kwargs]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join(missing)}")
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
