"""The measured step-time model: a few linear forms over a step's shape, each fitted (non-negative, relative
error) to a profile's grid, and the one that predicts held-out grid points best kept (leave-one-out
cross-validation on the profile, never on serving runs; k-fold where there are many points). Steps timed on the
served path (a "served" profile, frontierlm/sim/served.py) may also take the tabulated form
(frontierlm/sim/step_table.py), when they hold enough steps at two or more decode-row counts.

Why more than one form: on CPU the eager engine's costs are not one straight line. A step with a prefill chunk
pays fixed costs a decode-only step does not (its own attention call per chunk, the logits row gather), and a
one-token step runs its matmuls as matrix-vector products, which on the 33.6M benchmark model cost about half of
a two-row step (15-20 ms vs 30-40 ms, docs/benchmarks.md): one shared intercept put the one-row step 54% high.
"""
from __future__ import annotations

import numpy as np

from frontierlm.sim.step_table import SHARED, TableModel, knot_groups

BASE = ("const", "prefill_tokens", "prefill_pairs", "decode_reqs", "decode_ctx")
# prefill_step: 1 when the step holds a prefill chunk; multi_row: 1 when it runs more than one token;
# prefill_chunks: how many prefill chunks (only fitted when the profile timed steps with several).
FORMS = {
    "linear": BASE,
    "prefill_step": BASE + ("prefill_step",),
    "multi_row": BASE + ("multi_row",),
    "prefill_step+multi_row": BASE + ("prefill_step", "multi_row"),
}
TABLE = "table"  # frontierlm/sim/step_table.py: only offered for served steps
# a form with more terms must beat the simplest one within this share of its error to be chosen
SIMPLER_WITHIN = 0.01
LOO_MAX = 200  # more points than this: CV_FOLDS-fold cross-validation instead of leave-one-out
CV_FOLDS = 10


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


def cv_rel_errors(fit_predict, y: np.ndarray) -> np.ndarray:
    """|prediction - measured| / measured of each point from a fit without it: leave-one-out, or interleaved
    folds when there are more than LOO_MAX points. fit_predict(train, test) -> predictions at test."""
    n = len(y)
    folds = [np.array([i]) for i in range(n)] if n <= LOO_MAX else [np.arange(k, n, CV_FOLDS)
                                                                    for k in range(CV_FOLDS)]
    out = np.empty(n)
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        out[test] = np.abs(fit_predict(train, test) - y[test]) / y[test]
    return out


def loo_rel_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return cv_rel_errors(lambda tr, te: x[te] @ fit_form(x[tr], y[tr]), y)


def table_supported(rows: list[dict]) -> bool:
    """Two or more knots of enough steps each (frontierlm/sim/step_table.py)."""
    return len(knot_groups(np.array([r["decode_reqs"] for r in rows]))) >= 2


class StepModel:
    """Fit every form (or the one named) to the points; keep the best by cross-validated error. `table`: the
    points are served steps, so the tabulated form is a candidate too (where the data supports it)."""

    def __init__(self, points: list[dict], form: str | None = None, table: bool = False):
        names_ok = list(FORMS) + ([TABLE] if table else [])
        if form is not None and form not in names_ok:
            raise ValueError(f"step model must be one of {', '.join(names_ok)}, got {form!r}")
        rows = [point_features(p) for p in points]
        y = np.array([p["step_s"] for p in points], dtype=float)
        if (y <= 0).any():
            raise ValueError("profile step times must be positive")
        several = any(r["prefill_chunks"] > 1 for r in rows)
        forms = {name: f + (("prefill_chunks",) if several else ()) for name, f in FORMS.items()}
        if table and (form == TABLE or (form is None and table_supported(rows))):
            forms[TABLE] = None
        self.cv: dict[str, float] = {}
        best = None
        for name in [form] if form else forms:
            if name == TABLE:
                def fp(tr, te):
                    return TableModel([rows[i] for i in tr], y[tr]).predict_rows([rows[i] for i in te])
                x = None
                err = float(cv_rel_errors(fp, y).mean()) if len(y) > 2 * len(SHARED) else float("inf")
            else:
                x = np.array([[r[f] for f in forms[name]] for r in rows], dtype=float)
                err = float(loo_rel_errors(x, y).mean()) if len(y) > len(forms[name]) else float("inf")
            self.cv[name] = err
            if best is None or err < best[1] * (1 - SIMPLER_WITHIN):  # forms run from simple to rich
                best = (name, err, forms[name], x)
        self.form, self.cv_err, self.features, x = best
        self.table = None
        if self.form == TABLE:
            self.table = TableModel(rows, y)
            self.features, self.coef, self.rel_err = tuple(self.table.shared), None, self.table.rel_err
        else:
            self.coef = fit_form(x, y)
            self.rel_err = np.abs(x @ self.coef - y) / y

    def predict(self, values: dict) -> float:
        if self.table is not None:
            return self.table.predict(values)
        return float(sum(c * values[f] for c, f in zip(self.coef, self.features)))

    def describe(self) -> dict:
        coef = self.table.describe() if self.table is not None else dict(zip(self.features, self.coef.tolist()))
        return {"step_model": self.form, "coef": coef,
                "fit_rel_err_p50": float(np.median(self.rel_err)), "fit_rel_err_max": float(self.rel_err.max()),
                "cv_rel_err_mean": self.cv}
