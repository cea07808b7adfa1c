"""User logits processors with vLLM v1's interface, plus the `allowed_token_ids` mask.

Stage in the sampler (layers/sampler.py): after logit bias, bans and the grammar bitmask, before penalties and
temperature. A processor sees float32 logits [num_rows, vocab] of the requests that sample this step, row i being
the i-th such request, and returns them (in place or new). Rows that did not ask must come back unchanged.

A processor is a class:
    validate_params(cls, params)    classmethod; raise ValueError for bad SamplingParams.extra_args (add time)
    __init__(self, config, device, is_pin_memory)    once per engine; `config` is the EngineConfig
    is_argmax_invariant(self)       True if it never changes the argmax (then greedy-only steps skip apply())
    update_state(self, batch_update)  before apply() each step; None when the batch did not change
    apply(self, logits) -> logits

BatchUpdate follows vLLM: process `removed`, then `added`, then `moved`. `added` holds (index, SamplingParams,
prompt_token_ids, output_token_ids); output_token_ids is the request's live list, so it grows by itself.
"""
from __future__ import annotations

import abc
import enum
import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from frontierlm.sampling_params import SamplingParams


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = 0  # a -> b, slot a becomes empty
    SWAP = 1            # a <-> b


AddedRequest = tuple  # (index, SamplingParams, prompt_token_ids, output_token_ids)
MovedRequest = tuple  # (from_index, to_index, MoveDirectionality)


@dataclass(frozen=True)
class BatchUpdate:
    batch_size: int
    removed: Sequence[int]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(abc.ABC):
    """Base class of custom logits processors (vLLM v1's `LogitsProcessor` shape)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        return None

    def __init__(self, config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    @abc.abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the batch's rows: added, removed and moved requests since the last step."""

    @abc.abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The batch's logits [rows, vocab] after this processor."""


def process_dict_updates(entries: dict, batch_update: BatchUpdate | None,
                         new_state: Callable[[SamplingParams, list, list], object]) -> bool:
    """Keep `entries` (row index -> per-request state) in step with the batch; new_state returns None for
    requests the processor ignores. Returns whether anything changed."""
    if batch_update is None:
        return False
    changed = False
    for index in batch_update.removed:
        changed |= entries.pop(index, None) is not None
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            entries[index] = state
            changed = True
        else:
            changed |= entries.pop(index, None) is not None
    for a, b, direction in batch_update.moved:
        ea, eb = entries.pop(a, None), entries.pop(b, None)
        if ea is not None:
            entries[b] = ea
        if eb is not None and direction == MoveDirectionality.SWAP:
            entries[a] = eb
        changed |= ea is not None or eb is not None
    return changed


class AdapterLogitsProcessor(LogitsProcessor):
    """Wraps per-request functions `f(output_token_ids, logits_row) -> logits_row`: subclass it and implement
    new_req_logits_processor(params) (None for requests it ignores) and is_argmax_invariant()."""

    def __init__(self, config, device: torch.device, is_pin_memory: bool):
        self.req_funcs: dict[int, tuple[Callable, list[int]]] = {}

    def new_req_logits_processor(self, params: SamplingParams) -> Callable | None:
        """The per-request function for `params`, or None for requests this processor ignores (subclasses
        override it; the base ignores every request)."""
        return None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def make(params, prompt_ids, output_ids):
            fn = self.new_req_logits_processor(params)
            return None if fn is None else (fn, output_ids)

        process_dict_updates(self.req_funcs, batch_update, make)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (fn, output_ids) in self.req_funcs.items():
            logits[row] = fn(output_ids, logits[row])
        return logits


def _batch_update(old: list, new: list, params_of) -> BatchUpdate | None:
    """The BatchUpdate turning row order `old` into `new` (lists of request objects, compared by identity), valid
    under the removed -> added -> moved processing order: new requests take free slots below
    max(len(old), len(new)), then swaps put every request on its row."""
    old_ids, new_ids = [id(r) for r in old], [id(r) for r in new]
    if old_ids == new_ids:
        return None
    new_set, pos_old = set(new_ids), {r: i for i, r in enumerate(old_ids)}
    removed = [i for i, r in enumerate(old_ids) if r not in new_set]
    size = max(len(old), len(new))
    slot: list = [r if r in new_set else None for r in old_ids] + [None] * (size - len(old))
    free = iter([i for i, r in enumerate(slot) if r is None])
    added = []
    for r, req in zip(new_ids, new):
        if r not in pos_old:
            i = next(free)
            slot[i] = r
            params, prompt, output = params_of(req)
            added.append((i, params, prompt, output))
    where = {r: i for i, r in enumerate(slot) if r is not None}
    moved = []
    for target, r in enumerate(new_ids):
        src = where[r]
        if src == target:
            continue
        other = slot[target]
        moved.append((src, target, MoveDirectionality.SWAP if other is not None else MoveDirectionality.UNIDIRECTIONAL))
        slot[target], slot[src] = r, other
        where[r] = target
        if other is not None:
            where[other] = src
    return BatchUpdate(len(new), removed, added, moved)


def resolve_processor_class(spec) -> type:
    """A class, or its name as 'package.module:Class' or 'package.module.Class'."""
    if isinstance(spec, type):
        cls = spec
    elif isinstance(spec, str):
        module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module or not name:
            raise ValueError(f"logits processor {spec!r}: write it as 'package.module:ClassName'")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"logits processor {spec!r} cannot be imported: {e}") from None
    else:
        raise ValueError(f"logits_processors entries must be classes or 'module:Class' names, got {spec!r}; "
                         "per-request callables are vLLM v0's interface, subclass AdapterLogitsProcessor instead")
    missing = [m for m in ("update_state", "apply", "is_argmax_invariant") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"logits processor {cls.__name__} lacks {', '.join(missing)} (see LogitsProcessor)")
    return cls


class LogitsProcessors:
    """The engine's custom processors and the row bookkeeping that feeds their update_state()."""

    def __init__(self, specs: Sequence, config, device: torch.device):
        self.classes = [resolve_processor_class(s) for s in specs]
        pin = device.type == "cuda"
        self.processors = [cls(config, device, pin) for cls in self.classes]
        self._rows: list = []

    def __bool__(self) -> bool:
        return bool(self.processors)

    def validate_params(self, params: SamplingParams) -> None:
        for cls in self.classes:
            validate = getattr(cls, "validate_params", None)
            if validate is not None:
                validate(params)

    def update(self, states: Sequence) -> None:
        """Tell every processor how the rows changed since the previous step (states = this step's rows)."""
        rows = list(states)
        update = _batch_update(self._rows, rows, lambda r: (r.sampling_params, r.prompt_token_ids,
                                                            r.output_token_ids))
        self._rows = rows
        for p in self.processors:
            p.update_state(update)

    def argmax_invariant(self) -> bool:
        return all(p.is_argmax_invariant() for p in self.processors)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for p in self.processors:
            logits = p.apply(logits)
        return logits


def apply_allowed_token_ids(x: torch.Tensor, states: Sequence) -> None:
    """Rows with allowed_token_ids keep only those tokens (in place, -inf elsewhere)."""
    rows = [(i, s.sampling_params.allowed_token_ids) for i, s in enumerate(states)
            if s.sampling_params.allowed_token_ids]
    if not rows:
        return
    V = x.shape[1]
    keep = torch.zeros(len(rows), V, dtype=torch.bool)
    for j, (_, ids) in enumerate(rows):
        keep[j, [t for t in ids if t < V]] = True
    idx = torch.tensor([i for i, _ in rows], dtype=torch.int64).to(x.device, non_blocking=True)
    x[idx] = x[idx].masked_fill(~keep.to(x.device, non_blocking=True), float("-inf"))
