"""CUDA graphs for the decode fast path: one graph per ladder shape, all in one memory pool.

The forward reads only the persistent input buffers (engine/fast_decode.DecodeInputs), so a graph captured
once for a shape replays correctly for every later step of that shape after the buffers are refilled. Its
output tensor is static too: the caller consumes it (sampling) before the next replay overwrites it.

Shapes are captured largest first when captured up front (`capture_all`), which lets the smaller graphs reuse
the pool's memory; lazily (`run`) each shape is captured on first use.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from frontierlm.logger import init_logger

logger = init_logger(__name__)

WARMUP_RUNS = 2  # eager runs on a side stream before capture (lazy inits, allocator warm-up)


class CudaGraphPool:
    """Capture-once / replay-after bookkeeping for a forward(*static_args) -> tensor.

    `graph_factory` and `pool_factory` default to torch.cuda's; they are parameters so that the bookkeeping
    (which shape is captured when, which pool, what is replayed) is testable on a machine without a GPU.
    """

    def __init__(self, forward: Callable[..., torch.Tensor], graph_factory=None, pool_factory=None,
                 capture_context=None, stream_factory=None):
        self.forward = forward
        self._graph_factory = graph_factory or torch.cuda.CUDAGraph
        self._pool_factory = pool_factory or torch.cuda.graph_pool_handle
        self._capture = capture_context or (lambda g, pool, stream: torch.cuda.graph(g, pool=pool, stream=stream))
        self._stream_factory = stream_factory or torch.cuda.Stream
        self.pool = None
        self._stream = None
        self.graphs: dict[tuple, tuple[object, torch.Tensor, tuple]] = {}  # shape -> (graph, output, args)
        self.capture_seconds: dict[tuple, float] = {}
        self.replays = 0

    def capture(self, shape: tuple, args: tuple) -> None:
        if self.pool is None:
            self.pool = self._pool_factory()
            self._stream = self._stream_factory()
        t0 = time.perf_counter()
        _on_stream(self._stream, lambda: [self.forward(*args) for _ in range(WARMUP_RUNS)])
        graph = self._graph_factory()
        with self._capture(graph, self.pool, self._stream):
            out = self.forward(*args)
        self.graphs[shape] = (graph, out, tuple(a.data_ptr() for a in args))
        self.capture_seconds[shape] = time.perf_counter() - t0
        logger.info("decode fast path: captured a CUDA graph for batch %d x %d blocks in %.2fs", *shape,
                    self.capture_seconds[shape])

    def run(self, shape: tuple, args: tuple) -> torch.Tensor:
        """Replay the shape's graph (capturing it first if needed); `args` must be the same buffers as at capture."""
        if shape not in self.graphs:
            self.capture(shape, args)
        graph, out, ptrs = self.graphs[shape]
        if tuple(a.data_ptr() for a in args) != ptrs:
            raise RuntimeError(f"CUDA graph for shape {shape} replayed with other input buffers than captured")
        graph.replay()
        self.replays += 1
        return out

    def capture_all(self, shapes_and_args: list[tuple[tuple, tuple]]) -> None:
        """Capture every shape up front, largest batch first (smaller graphs then fit in the pool's blocks)."""
        for shape, args in sorted(shapes_and_args, key=lambda sa: sa[0], reverse=True):
            if shape not in self.graphs:
                self.capture(shape, args)


def _on_stream(stream, fn) -> None:
    if stream is None or not hasattr(stream, "wait_stream"):  # the testing stand-in
        fn()
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
