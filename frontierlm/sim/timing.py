"""Step-time models for the simulator's stand-in runner: a measured profile (`frontierlm profile`) or the
planner's roofline for hardware we do not have.

Both see a step as a few numbers (`BatchShape`): prefill tokens and their attention pairs (query x key),
decode rows and the sum of their contexts, and speculative draft tokens verified alongside decode rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

FEATURES = ("const", "prefill_tokens", "prefill_pairs", "decode_reqs", "decode_ctx")


@dataclass
class BatchShape:
    prefill_tokens: int = 0
    prefill_pairs: int = 0  # sum over prefill tokens of the keys each attends to
    decode_reqs: int = 0
    decode_ctx: int = 0  # sum of the decode rows' context lengths
    spec_tokens: int = 0  # draft tokens scored with the decode rows
    spec_ctx: int = 0  # keys the draft tokens attend to
    prefill_ctx: int = 0  # distinct positions the prefill chunks read (for the KV bytes)
    rows: int = 0  # requests in the step (decode rows and prefill chunks)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_reqs + self.spec_tokens

    def features(self) -> list[float]:
        # draft tokens cost like prefill tokens attending over the decode context
        return [1.0, self.prefill_tokens + self.spec_tokens, self.prefill_pairs + self.spec_ctx,
                self.decode_reqs, self.decode_ctx]


def prefill_pairs(start: int, num: int) -> int:
    """Keys attended by queries at positions start .. start+num-1 (causal): sum of (p + 1)."""
    return num * start + num * (num + 1) // 2


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (drop the most negative feature until none is left)."""
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        x[active] = sol
        if (sol >= 0).all() or len(active) == 1:
            return np.maximum(x, 0.0)
        active.pop(int(np.argmin(sol)))


class ProfileTimer:
    """Step time = a linear model over BatchShape features, fitted (non-negative) to the measured grid, plus an
    optional serving overhead per step and per row (what a server adds around the engine step: streaming each
    row's token out, the HTTP side's share of the CPU), from the profile's "overhead" block or the arguments."""

    def __init__(self, profile: dict, step_overhead_s: float | None = None, row_overhead_s: float | None = None):
        points = profile.get("points")
        if not points:
            raise ValueError("the profile has no measured points")
        self.profile = profile
        rows = np.array([[p[f] if f != "const" else 1.0 for f in FEATURES] for p in points], dtype=float)
        y = np.array([p["step_s"] for p in points], dtype=float)
        # relative error matters (small steps are most of a decode run): weight rows by 1 / time
        w = 1.0 / np.maximum(y, 1e-9)
        self.coef = nnls(rows * w[:, None], y * w)
        pred = rows @ self.coef
        self.rel_err = np.abs(pred - y) / y
        self.kv_bytes_per_token = profile.get("kv_bytes_per_token")
        over = profile.get("overhead") or {}
        self.step_overhead_s = over.get("step_s", 0.0) if step_overhead_s is None else step_overhead_s
        self.row_overhead_s = over.get("row_s", 0.0) if row_overhead_s is None else row_overhead_s
        if self.step_overhead_s < 0 or self.row_overhead_s < 0:
            raise ValueError("serving overheads must be >= 0")

    @classmethod
    def load(cls, path: str, step_overhead_s: float | None = None, row_overhead_s: float | None = None
             ) -> "ProfileTimer":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read profile {path!r}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"profile {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {path!r} must hold a JSON object")
        return cls(data, step_overhead_s, row_overhead_s)

    def step_time(self, b: BatchShape) -> float:
        return float(np.dot(self.coef, b.features())) + self.step_overhead_s + self.row_overhead_s * b.rows

    def describe(self) -> dict:
        return {"kind": "profile", "model": self.profile.get("model"), "device": self.profile.get("device"),
                "coef": dict(zip(FEATURES, self.coef.tolist())),
                "fit_rel_err_p50": float(np.median(self.rel_err)), "fit_rel_err_max": float(self.rel_err.max()),
                "step_overhead_s": self.step_overhead_s, "row_overhead_s": self.row_overhead_s}


class RooflineTimer:
    """max(FLOPs / (peak * mfu), bytes / (bandwidth * mbu)) + a fixed per-step overhead, per GPU of a TP group,
    plus two all-reduces of the step's hidden states per layer over the interconnect when tp > 1."""

    def __init__(self, shape, gpu, tp: int = 1, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 mfu: float = 0.6, mbu: float = 0.8, overhead_s: float = 0.0):
        from frontierlm.plan.model import DTYPE_BYTES

        for name, v in (("mfu", mfu), ("mbu", mbu)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        self.shape, self.gpu, self.tp = shape, gpu, tp
        self.mfu, self.mbu, self.overhead_s = mfu, mbu, overhead_s
        wpp = DTYPE_BYTES[weight_dtype]
        mc = shape.mc
        self.flops_per_token = 2 * shape.matmul_params_per_token() / tp
        self.flops_per_pair = 2 * mc.num_heads * (shape.qk_head_dim + shape.v_head_dim) * mc.num_layers / tp
        self.kv_bytes_per_token = shape.kv_bytes_per_token(kv_dtype)
        self.kv_read_per_pos = self.kv_bytes_per_token / (1 if mc.is_mla else min(tp, mc.num_kv_heads))
        experts = shape.routed_expert_params()
        self.dense_bytes = (shape.num_params() - experts) * wpp / tp
        self.expert_bytes = experts * wpp / tp
        self.peak = gpu.flops(weight_dtype) * mfu
        self.bw = gpu.mem_bw * mbu
        self.hidden_bytes = mc.hidden_size * 2 * mc.num_layers * 2  # two bf16 all-reduces per layer

    def step_time(self, b: BatchShape) -> float:
        tokens = b.num_tokens
        if tokens == 0:
            return self.overhead_s
        s = self.shape
        touched = 1.0
        if s.is_moe:  # expected share of experts some token of the step is routed to
            touched = 1.0 - (1.0 - s.experts_per_token / s.num_experts) ** tokens
        pairs = b.prefill_pairs + b.decode_ctx + b.spec_ctx
        flops = tokens * self.flops_per_token + pairs * self.flops_per_pair
        kv_read = (b.decode_ctx + b.prefill_ctx) * self.kv_read_per_pos  # drafts reuse their row's KV read
        byts = self.dense_bytes + self.expert_bytes * touched + kv_read + tokens * self.kv_read_per_pos
        t = max(flops / self.peak, byts / self.bw) + self.overhead_s
        if self.tp > 1:
            t += 2 * (self.tp - 1) / self.tp * tokens * self.hidden_bytes / self.gpu.interconnect_bw
        return t

    def describe(self) -> dict:
        return {"kind": "roofline", "model": self.shape.name, "gpu": self.gpu.name, "tp": self.tp, "mfu": self.mfu,
                "mbu": self.mbu, "overhead_s": self.overhead_s}
