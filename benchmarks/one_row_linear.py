"""One-row products at the anchor model's decode shapes: the BLAS kernels vs inductor's multiply-and-sum.

    python benchmarks/one_row_linear.py --threads 2 --dtype float32

The 33 weight matrices of one batch-1 decode step of the 33.6M benchmark Llama (8 layers of qkv, o, gate_up,
down, and the LM head), each distinct, so every step reads all 134 MB (float32) from memory as a real decode
step does: F.linear (MKL for float32), oneDNN's prepacked linear, MKL's packed linear (what inductor's freezing
picks for float32 at a static batch), and `layers.linear.linear` compiled (one static row -> a reduction).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(512, 1024), (512, 512), (512, 3072), (1536, 512)] * 8 + [(512, 8192)]  # (in, out)


def timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from frontierlm.layers.linear import linear

    dt = getattr(torch, a.dtype)
    ws = [torch.randn(n, k, dtype=dt) for k, n in SHAPES]
    xs = {k: torch.randn(1, k, dtype=dt) for k, _ in SHAPES}
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    kernels = {
        "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
        "oneDNN prepacked": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                                     for w, p in zip(ws, onednn)],
    }
    if dt == torch.float32 and torch._C.has_mkl:
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in ws]
        kernels["MKL packed"] = lambda: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, 1)
                                         for w, p in zip(ws, mkl)]
    compiled = torch.compile(lambda xs, ws: [linear(xs[w.shape[1]], w) for w in ws], dynamic=False)
    kernels["compiled linear()"] = lambda: compiled(xs, ws)
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    result = {"threads": a.threads, "dtype": a.dtype, "weight_mb": round(nbytes / 1e6, 1), "ms_per_step": {}}
    for _ in range(a.rounds):
        for name, fn in kernels.items():
            s = timed(fn, a.steps)
            result["ms_per_step"].setdefault(name, []).append(round(s * 1e3, 2))
            print(json.dumps({"kernel": name, "ms": round(s * 1e3, 2), "GB_s": round(nbytes / s / 1e9, 1)}),
                  flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
