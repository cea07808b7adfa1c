"""The decode fast path: steps in which every scheduled request decodes one token run a static-shape forward.

The batch is padded up to the next size of a ladder (1, 2, 4, 8, ... up to max_num_seqs) and the block tables to
the next width of a second ladder, so a long decode run sees a handful of shapes. Inputs live in persistent
buffers and the attention reads the paged cache in place (layers/paged_decode.py). Padding rows point at a
scratch block that the cache manager never hands out.

- CPU: the forward is compiled with torch.compile (inductor's C++ backend), once per ladder shape, the first
  time that shape comes up after a short warm-up of eager steps (tests and one-off prompts never pay for a
  compile), or all at start-up (`precompile`, EngineConfig.compile_decode_at_startup). Inductor's on-disk cache
  (engine/compile_cache.py) makes later processes compile the same graphs much faster.
- CUDA: the same forward is captured as a CUDA graph per ladder shape, all sharing one memory pool
  (engine/cuda_graphs.py), and replayed.

Mixed and prefill steps keep the eager path; EngineConfig(enforce_eager=True) turns this module off.
"""
from __future__ import annotations

import bisect
import itertools
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from frontierlm.engine.compile_cache import CacheProbe, use_persistent_inductor_cache
from frontierlm.layers.paged_decode import PagedDecodePlan
from frontierlm.logger import init_logger

logger = init_logger(__name__)

# Eager decode steps before the first compile, so short runs (single prompts) never wait for one;
# FRONTIERLM_DECODE_WARMUP_STEPS overrides it (the test suite sets it high outside tests/test_fast_path.py).
WARMUP_DECODE_STEPS = int(os.environ.get("FRONTIERLM_DECODE_WARMUP_STEPS", "32"))


# CPU: compile the batch and block-table dims as symbols (one graph for all ladder shapes but batch 1, which
# gets its own specialized graph) rather than one graph per shape; inputs are still padded to the ladders.
CPU_DYNAMIC_SHAPES = True
# Freezing folds the weights into the graph as constants, so inductor prepacks them for oneDNN / its own GEMM
# templates, and max-autotune picks inductor's C++ GEMM (AMX / AVX-512 micro-kernels) where it times faster than
# ATen's. At batch 1 on the 33.6M benchmark Llama (2 threads, docs/benchmarks.md) these two took decode from 140 to
# 175 tok/s in float32 and from 132 to 329 in bfloat16, for a longer first compile (about 100 s cold, cached after).
# realize_reads_threshold=1: a pointwise result read by two or more ops is stored rather than recomputed by each
# (the residual stream, and the norm output that layers.linear's one-row products read once per row slice).
CPU_INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        "cpp_wrapper": True, "realize_reads_threshold": 1}
# CPU, symbolic-batch graphs: a step runs its rows unpadded (the batch ladder then only names the shapes that
# start-up compiles). A padding row costs a full row there: its attention runs over the whole block-table width.
CPU_EXACT_BATCH = True
# Larger decode batches take the eager path (their per-op overhead is a small share of the step).
MAX_FAST_BATCH = 256


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then alternately x1.5 and x1.33 (12, 16, 24, 32, 48, 64, ...), capped at max_batch (always
    the last rung): padding adds at most half a step's rows."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_batch:
        sizes += [sizes[-1] * 3 // 2, sizes[-1] * 2]
    return [b for b in sizes if b < max_batch] + [max_batch]


def width_ladder(max_blocks: int, smallest: int = 8, fine: bool = False) -> list[int]:
    """Block-table widths: powers of two from `smallest` (fine: with the x1.5 rung between, 8, 12, 16, 24, ...),
    capped at max_blocks (the last rung)."""
    widths, w = [], min(smallest, max_blocks)
    while w < max_blocks:
        widths.append(w)
        if fine and w * 3 // 2 < min(2 * w, max_blocks) and w % 2 == 0:
            widths.append(w * 3 // 2)
        w *= 2
    return widths + [max_blocks]


def unpadded_or(ladder: list[int], device: torch.device) -> list[int]:
    """The sizes a step's rows are padded to: every size up to the top rung on CPU with symbolic-batch graphs
    (a padding row costs its full share there and buys no compile), else the ladder."""
    exact = device.type == "cpu" and CPU_DYNAMIC_SHAPES and CPU_EXACT_BATCH
    return list(range(1, ladder[-1] + 1)) if exact else ladder


def compile_decode_graph(forward, num_shapes: int):
    """torch.compile of a decode-style forward, allowing one graph per ladder shape from its code object."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_shapes + 8)
    return torch.compile(forward, dynamic=None if CPU_DYNAMIC_SHAPES else False, fullgraph=True)


def rung(ladder: list[int], n: int) -> int | None:
    """The smallest ladder size >= n, or None when n is past the top."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else None


class DecodeInputs:
    """Persistent host and device buffers of the largest decode step, filled without per-request Python math.
    The block table of a [batch, width] step is the contiguous front of a flat buffer, so every step hands the
    graph the same strides (a strided slice of a wider table would make the compiler guard on its stride)."""

    def __init__(self, max_seqs: int, max_blocks: int, scratch_block: int, block_size: int,
                 device: torch.device):
        self.block_size, self.scratch_block = block_size, scratch_block
        pin = device.type == "cuda"
        shapes = {"input_ids": (max_seqs,), "positions": (max_seqs,), "slot_mapping": (max_seqs,),
                  "block_tables": (max_seqs * max_blocks,), "seq_lens": (max_seqs,), "real_rows": (max_seqs,)}
        self.host = {k: torch.zeros(s, dtype=torch.long, pin_memory=pin) for k, s in shapes.items()}
        self._np = {k: v.numpy() for k, v in self.host.items()}
        # on CPU the graph reads the host buffers themselves: no copy per step
        self.dev = self.host if device.type == "cpu" else {
            k: torch.zeros(s, dtype=torch.long, device=device) for k, s in shapes.items()}
        self.non_blocking = pin
        self._views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def fill(self, sched, batch: int, width: int) -> None:
        """Rows [0, n) from the scheduled requests, rows [n, batch) padding; then one copy per buffer."""
        if batch == 1 and len(sched.scheduled) == 1:  # batch-1 decode: scalar writes, no arrays built per step
            self._fill_one(sched.scheduled[0], width)
        else:
            self._fill_rows(sched, batch, width)

    def _fill_rows(self, sched, batch: int, width: int) -> None:
        n, bs = len(sched.scheduled), self.block_size
        h = self._np
        reqs = [s.request for s in sched.scheduled]
        pos = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=n)
        h["input_ids"][:n] = [r.all_token_ids[-1] for r in reqs]  # a decode step feeds the last token
        h["positions"][:n] = pos
        h["seq_lens"][:n] = pos + 1
        h["real_rows"][:n] = 1
        tables = h["block_tables"][:batch * width].reshape(batch, width)
        counts = np.fromiter((len(s.block_ids) for s in sched.scheduled), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(s.block_ids for s in sched.scheduled), dtype=np.int64,
                           count=int(counts.sum()))
        tables[:] = self.scratch_block
        tables[:n][np.arange(width)[None, :] < counts[:, None]] = flat
        h["slot_mapping"][:n] = tables[np.arange(n), pos // bs] * bs + pos % bs
        # padding rows: token 0 at position 0, writing and reading the scratch block's first slot
        for k in ("input_ids", "positions"):
            h[k][n:batch] = 0
        h["seq_lens"][n:batch] = 1
        h["real_rows"][n:batch] = 0
        h["slot_mapping"][n:batch] = self.scratch_block * bs
        if self.dev is self.host:
            return
        for k, host in self.host.items():
            rows = batch * width if k == "block_tables" else batch
            self.dev[k][:rows].copy_(host[:rows], non_blocking=self.non_blocking)

    def _fill_one(self, s, width: int) -> None:
        """`fill` for one request in a batch-1 step (CPU: the graph reads these buffers; no copies)."""
        h, bs, req, blocks = self._np, self.block_size, s.request, s.block_ids
        pos = req.num_computed_tokens
        h["input_ids"][0] = req.all_token_ids[-1]
        h["positions"][0] = pos
        h["seq_lens"][0] = pos + 1
        h["real_rows"][0] = 1
        table = h["block_tables"]
        table[:len(blocks)] = blocks
        table[len(blocks):width] = self.scratch_block
        h["slot_mapping"][0] = blocks[pos // bs] * bs + pos % bs
        if self.dev is not self.host:
            for k, host in self.host.items():
                rows = width if k == "block_tables" else 1
                self.dev[k][:rows].copy_(host[:rows], non_blocking=self.non_blocking)

    def views(self, batch: int, width: int) -> tuple[torch.Tensor, ...]:
        """The step's input tensors: views of the persistent buffers, built once per shape (a few us a step)."""
        v = self._views.get((batch, width))
        if v is None:
            v = self._views[(batch, width)] = self._make_views(batch, width)
        return v

    def _make_views(self, batch: int, width: int) -> tuple[torch.Tensor, ...]:
        d = self.dev
        return (d["input_ids"][:batch], d["positions"][:batch], d["slot_mapping"][:batch],
                d["block_tables"][:batch * width].view(batch, width), d["seq_lens"][:batch], d["real_rows"][:batch])


@dataclass
class DecodeMeta:
    """What the model shell reads from the attention metadata in a decode step: a static context bound (the
    rope table covers the whole context, so no step grows it) and, for dynamic NTK rope, the per-row lengths."""
    max_seq_len: int
    seq_lens: torch.Tensor

    @property
    def query_lens_cpu(self) -> list[int]:  # built only when read: a list of B ones would fix B in the graph
        return [1] * self.seq_lens.shape[0]


def decode_forward(model, max_model_len: int, block_size: int, input_ids, positions, slot_mapping,
                   block_tables, seq_lens, real_rows) -> torch.Tensor:
    """One decode step of `model` on static-shape inputs -> float32 logits [B, vocab]. Only tensors and
    constants flow in, so a compiled or captured copy of it is valid for every step of the same shape."""
    plan = PagedDecodePlan(slot_mapping, block_tables, seq_lens, block_size, real_rows)
    meta = DecodeMeta(max_model_len, seq_lens)
    hidden = model.model(input_ids, positions, meta, plan)
    return model.compute_logits(hidden)


def call_compiled(compiled, args: tuple, first: bool, table_arg: int):
    """Call a CPU decode-style graph on persistent buffers (args[table_arg] is the block table)."""
    if not first:  # a shape already compiled: no marking, and only the guards that tell its graphs apart
        # (batch 1 vs symbolic, this model vs another in the process); the inputs are the same buffers every
        # step, so the full guard set can only pass. 0.1-0.2 ms less per call at batch 1.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return compiled(*args)
    if CPU_DYNAMIC_SHAPES:  # one graph for every batch > 1 and every width: few compiles on a slow host
        for t in args:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(args[table_arg], 1)
    # A call that may compile: the options are set globally for it (torch.compile's `options=` did not reach
    # the freezing pass here, measured at half the speed).
    with torch._inductor.config.patch(CPU_INDUCTOR_OPTIONS):
        return compiled(*args)


class FastDecode:
    """Owns the ladders, the buffers and one compiled (CPU) or captured (CUDA) forward per ladder shape."""

    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int,
                 scratch_block: int):
        self.model, self.device = model, device
        self.max_model_len, self.block_size = max_model_len, block_size
        max_blocks = -(-max_model_len // block_size)
        self.ladder = batch_ladder(min(max_num_seqs, MAX_FAST_BATCH))  # the shapes compiled or captured
        self.batch_sizes = unpadded_or(self.ladder, device)  # what a step's rows are padded to
        # CPU: the compiled attention loops over every padded position, and its graphs take the width as a symbol
        # (no compile per rung), so the finer ladder cuts the padding (x2 -> x1.5 at most; batch 1 bf16 on a Zen 4:
        # +6% in an in-process A/B). CUDA captures one graph per shape and its kernel stops at each row's length.
        self.widths = width_ladder(max_blocks, fine=device.type == "cpu")
        self.inputs = DecodeInputs(max_num_seqs, max_blocks, scratch_block, block_size, device)
        self.decode_steps = 0  # eager and fast decode steps seen, for the warm-up rule
        self.warmup_steps = WARMUP_DECODE_STEPS
        self.fast_steps = 0
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._seen: set[tuple[int, int]] = set()
        self.disabled = False
        self.inductor_cache_dir = use_persistent_inductor_cache()
        self.startup_compile: tuple[int, float, str] | None = None  # (shapes, seconds, cache verdict)
        if device.type == "cuda":
            from frontierlm.engine.cuda_graphs import CudaGraphPool

            self._graphs = CudaGraphPool(self._forward)
            self._compiled = None
        else:
            self._graphs = None
            self._compiled = None  # built on first use: importing the compiler stack costs seconds

    def describe(self) -> str:
        how = "CUDA graphs" if self._graphs is not None else "torch.compile (inductor)"
        unpadded = " (batches run unpadded)" if self.batch_sizes != self.ladder else ""
        head = f"decode fast path: {how}, batch ladder {self.ladder}{unpadded}, block-table widths {self.widths}, "
        if self.disabled:
            return head + "turned off (the model could not be compiled; decode runs eager)"
        if self.startup_compile is None:
            return head + f"each shape compiled on first use after {self.warmup_steps} eager decode steps"
        n, seconds, cache = self.startup_compile
        return (head + f"compiled at start-up: {n} shapes in {seconds:.1f}s (inductor cache {cache}, "
                       f"{self.inductor_cache_dir})")

    def startup_shapes(self) -> list[tuple[int, int]]:
        """What `precompile` runs. CPU: every batch rung at the narrowest width and every width at batch 1 and 2,
        which covers both graphs (batch 1, symbolic batch > 1) and every rung of both ladders, so a later shape
        finds its guards already passed. CUDA: every shape (one graph each), largest first so the smaller graphs
        reuse the pool's memory."""
        if self._graphs is not None:
            return sorted(((b, w) for b in self.ladder for w in self.widths), reverse=True)
        batches = self.ladder[:2]
        shapes = [(b, w) for b in batches for w in self.widths[:1]]  # the two graphs' first compiles
        shapes += [(b, self.widths[0]) for b in self.ladder[2:]]
        shapes += [(b, w) for b in batches for w in self.widths[1:]]
        return shapes

    def precompile(self, progress: bool = True) -> None:
        """Compile (CPU) or capture (CUDA) the decode graphs now, before any request: one decode step per
        `startup_shapes` shape through the same path real steps take, with every row a padding row (it reads and
        writes only the scratch block), so no request, scheduler state or KV block is touched. The eager warm-up
        is then skipped: the graphs are ready. A tqdm bar on stderr shows the shapes."""
        from tqdm.auto import tqdm

        no_requests = SimpleNamespace(scheduled=[])
        shapes = self.startup_shapes()
        probe = CacheProbe(self.inductor_cache_dir)
        t0 = time.perf_counter()
        with torch.inference_mode():  # the engine's steps run in inference mode, and dynamo guards on it
            for shape in tqdm(shapes, desc="compiling decode graphs", unit="shape", file=sys.stderr,
                              disable=not progress):
                if self._step(shape, no_requests) is None:  # this model cannot be compiled: stays eager
                    break
        self.startup_compile = (len(shapes), time.perf_counter() - t0, probe.verdict())
        self.warmup_steps = 0
        logger.info("decode fast path: %d shapes compiled at start-up in %.1fs (inductor cache %s)",
                    *self.startup_compile)

    def _forward(self, *args):
        return decode_forward(self.model, self.max_model_len, self.block_size, *args)

    def _ensure_compiled(self) -> None:
        if self._compiled is None:
            self._compiled = compile_decode_graph(self._forward, len(self.ladder) * len(self.widths))

    def _run_compiled(self, args: tuple, first: bool) -> torch.Tensor:
        self._ensure_compiled()
        return call_compiled(self._compiled, args, first, table_arg=3)

    def shape_for(self, sched) -> tuple[int, int] | None:
        """The ladder shape of a pure decode step, or None when the step is not one (or does not fit)."""
        scheduled = sched.scheduled
        if not scheduled or any(s.num_new_tokens != 1 or not s.samples for s in scheduled):
            return None
        batch = rung(self.batch_sizes, len(scheduled))
        width = rung(self.widths, max(len(s.block_ids) for s in scheduled))
        return None if batch is None or width is None else (batch, width)

    def run(self, sched) -> torch.Tensor | None:
        """Logits [num_scheduled, vocab] of a pure decode step through the fast path, or None: not a pure
        decode step, or still warming up (the caller then runs the eager forward)."""
        shape = None if self.disabled else self.shape_for(sched)
        if shape is None:
            return None
        self.decode_steps += 1
        if self.decode_steps <= self.warmup_steps:
            return None
        logits = self._step(shape, sched)
        if logits is None:
            return None
        self.fast_steps += 1
        return logits[:len(sched.scheduled)]

    def _step(self, shape: tuple[int, int], sched) -> torch.Tensor | None:
        """Logits [batch, vocab] of `sched`'s requests padded to `shape`, compiling or capturing the shape on
        first use; None when that first use fails (the fast path then turns itself off)."""
        batch, width = shape
        self.inputs.fill(sched, batch, width)
        args = self.inputs.views(batch, width)
        first = shape not in self._seen
        t0 = time.perf_counter()
        try:
            logits = self._graphs.run(shape, args) if self._graphs is not None else self._run_compiled(args, first)
        except Exception as e:  # a model this path cannot trace or capture: stay eager from now on
            if not first:
                raise
            logger.warning("decode fast path turned off: %s: %s", type(e).__name__, e)
            self.disabled = True
            return None
        if first:
            self._seen.add(shape)
            self.compile_seconds[shape] = time.perf_counter() - t0
            seconds = self.compile_seconds[shape]  # (a shape an existing graph covers only passes its guards)
            (logger.info if seconds > 0.5 else logger.debug)(
                "decode fast path: first step of batch %d x %d blocks in %.1fs", batch, width, seconds)
        return logits
