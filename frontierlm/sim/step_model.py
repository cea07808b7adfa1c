"""The measured step-time model: a few linear forms over a step's shape, each fitted (non-negative, relative
error) to a profile's grid, and the one that predicts held-out grid points best kept (leave-one-out
cross-validation on the profile, never on serving runs).

Why more than one form: on CPU the eager engine's costs are not one straight line. A step with a prefill chunk
pays fixed costs a decode-only step does not (its own attention call per chunk, the logits row gather), and a
one-token step runs its matmuls as matrix-vector products, which on the 33.6M benchmark model cost about half of
a two-row step (15-20 ms vs 30-40 ms, docs/benchmarks.md): one shared intercept put the one-row step 54% high.
"""
from __future__ import annotations

import numpy as np

BASE = ("const", "prefill_tokens", "prefill_pairs", "decode_reqs", "decode_ctx")
# prefill_step: 1 when the step holds a prefill chunk; multi_row: 1 when it runs more than one token;
# prefill_chunks: how many prefill chunks (only fitted when the profile timed steps with several).
FORMS = {
    "linear": BASE,
    "prefill_step": BASE + ("prefill_step",),
    "multi_row": BASE + ("multi_row",),
    "prefill_step+multi_row": BASE + ("prefill_step", "multi_row"),
}
# a form with more terms must beat the simplest one within this share of its error to be chosen
SIMPLER_WITHIN = 0.01


def point_features(p: dict) -> dict:
    """Feature values of one profile point (older profiles lack prefill_chunks: one chunk when P > 0)."""
    tokens, decode = p["prefill_tokens"], p["decode_reqs"]
    chunks = p.get("prefill_chunks", 1 if tokens else 0)
    return {"const": 1.0, "prefill_tokens": tokens, "prefill_pairs": p["prefill_pairs"], "decode_reqs": decode,
            "decode_ctx": p["decode_ctx"], "prefill_step": 1.0 if chunks else 0.0,
            "multi_row": 1.0 if tokens + decode >= 2 else 0.0, "prefill_chunks": chunks}


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


def fit_form(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Relative error matters (small steps are most of a decode run): rows weighted by 1 / time."""
    w = 1.0 / np.maximum(y, 1e-9)
    return nnls(x * w[:, None], y * w)


def loo_rel_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|prediction - measured| / measured of each point, fitted without it."""
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        out[i] = abs(x[i] @ fit_form(x[keep], y[keep]) - y[i]) / y[i]
    return out


class StepModel:
    """Fit every form (or the one named) to the points; keep the best by leave-one-out error."""

    def __init__(self, points: list[dict], form: str | None = None):
        if form is not None and form not in FORMS:
            raise ValueError(f"step model must be one of {', '.join(FORMS)}, got {form!r}")
        rows = [point_features(p) for p in points]
        y = np.array([p["step_s"] for p in points], dtype=float)
        if (y <= 0).any():
            raise ValueError("profile step times must be positive")
        several = any(r["prefill_chunks"] > 1 for r in rows)
        forms = {name: f + (("prefill_chunks",) if several else ()) for name, f in FORMS.items()}
        self.cv: dict[str, float] = {}
        best = None
        for name in [form] if form else forms:
            names = forms[name]
            x = np.array([[r[f] for f in names] for r in rows], dtype=float)
            err = float(loo_rel_errors(x, y).mean()) if len(y) > len(names) else float("inf")
            self.cv[name] = err
            if best is None or err < best[1] * (1 - SIMPLER_WITHIN):  # FORMS runs from simple to rich
                best = (name, err, names, x)
        self.form, self.cv_err, self.features, x = best
        self.coef = fit_form(x, y)
        self.rel_err = np.abs(x @ self.coef - y) / y

    def predict(self, values: dict) -> float:
        return float(sum(c * values[f] for c, f in zip(self.coef, self.features)))

    def describe(self) -> dict:
        return {"step_model": self.form, "coef": dict(zip(self.features, self.coef.tolist())),
                "fit_rel_err_p50": float(np.median(self.rel_err)), "fit_rel_err_max": float(self.rel_err.max()),
                "cv_rel_err_mean": self.cv}
