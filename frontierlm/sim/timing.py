"""Step-time models for the simulator's stand-in runner: a measured profile (`frontierlm profile`) or the
planner's roofline for hardware we do not have.

Both see a step as a few numbers (`BatchShape`): prefill tokens, chunks and their attention pairs (query x key),
decode rows and the sum of their contexts, and speculative draft tokens verified alongside decode rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from frontierlm.sim.step_model import BASE as FEATURES, StepModel, nnls  # noqa: F401  (nnls: re-exported)


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
    prefill_chunks: int = 0  # requests in the step that prefill (a chunk each)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_reqs + self.spec_tokens

    def feature_values(self) -> dict:
        # draft tokens cost like prefill tokens attending over the decode context
        tokens = self.prefill_tokens + self.spec_tokens
        return {"const": 1.0, "prefill_tokens": tokens, "prefill_pairs": self.prefill_pairs + self.spec_ctx,
                "decode_reqs": self.decode_reqs, "decode_ctx": self.decode_ctx,
                "prefill_step": 1.0 if self.prefill_chunks else 0.0,
                "multi_row": 1.0 if self.num_tokens >= 2 else 0.0, "prefill_chunks": self.prefill_chunks}

    def features(self) -> list[float]:
        v = self.feature_values()
        return [v[f] for f in FEATURES]


def prefill_pairs(start: int, num: int) -> int:
    """Keys attended by queries at positions start .. start+num-1 (causal): sum of (p + 1)."""
    return num * start + num * (num + 1) // 2


class ProfileTimer:
    """Step time = the profile's step model (frontierlm/sim/step_model.py) plus what a server adds around the
    engine step, from the profile's "overhead" block (benchmarks/sim_calibration.py fits it) or the arguments:
      step_s     per step (the engine loop, the stats sink),
      row_s      per request in the step (its token through the output thread and the SSE stream),
      row2_s     per request in the step times the requests in the step: contention that grows with the batch
                 (an engine thread that waits for the GIL while another core streams the step's tokens),
      request_s  CPU per request that shares the engine's core (HTTP parsing, admission, stream set-up and
                 tear-down run under the same GIL): charged to the instance's next step (Instance.add),
      ingress_s  latency from a client's send to the engine's queue that costs the engine nothing."""

    OVERHEADS = ("step_s", "row_s", "row2_s", "request_s", "ingress_s")

    def __init__(self, profile: dict, step_overhead_s: float | None = None, row_overhead_s: float | None = None,
                 request_overhead_s: float | None = None, step_model: str | None = None):
        points = profile.get("points")
        if not points:
            raise ValueError("the profile has no measured points")
        self.profile = profile
        # a "served" profile holds steps timed on the served path (frontierlm/sim/served.py): it may be tabulated
        served = profile.get("source") == "served"
        self.model = StepModel(points, step_model or profile.get("step_model"), table=served)
        self.coef, self.rel_err = self.model.coef, self.model.rel_err
        self.kv_bytes_per_token = profile.get("kv_bytes_per_token")
        over = profile.get("overhead") or {}
        given = {"step_s": step_overhead_s, "row_s": row_overhead_s, "request_s": request_overhead_s}
        vals = {k: float(over.get(k, 0.0)) if given.get(k) is None else float(given[k]) for k in self.OVERHEADS}
        if min(vals.values()) < 0:
            raise ValueError(f"serving overheads must be >= 0, got {vals}")
        self.step_overhead_s, self.row_overhead_s = vals["step_s"], vals["row_s"]
        self.row2_overhead_s = vals["row2_s"]
        self.request_overhead_s, self.ingress_latency_s = vals["request_s"], vals["ingress_s"]

    @classmethod
    def load(cls, path: str, step_overhead_s: float | None = None, row_overhead_s: float | None = None,
             request_overhead_s: float | None = None, step_model: str | None = None) -> "ProfileTimer":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read profile {path!r}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"profile {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {path!r} must hold a JSON object")
        return cls(data, step_overhead_s, row_overhead_s, request_overhead_s, step_model)

    def engine_time(self, b: BatchShape) -> float:
        """The engine's own step, without the server's overheads."""
        return self.model.predict(b.feature_values())

    def step_time(self, b: BatchShape) -> float:
        rows = b.rows
        return self.engine_time(b) + self.step_overhead_s + (self.row_overhead_s + self.row2_overhead_s * rows) * rows

    def describe(self) -> dict:
        return {"kind": "profile", "model": self.profile.get("model"), "device": self.profile.get("device"),
                **self.model.describe(), "step_overhead_s": self.step_overhead_s,
                "row_overhead_s": self.row_overhead_s, "row2_overhead_s": self.row2_overhead_s,
                "request_overhead_s": self.request_overhead_s,
                "ingress_latency_s": self.ingress_latency_s}


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
