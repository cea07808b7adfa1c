"""A tabulated step model for steps timed on the served path (frontierlm/sim/served.py): a table of step
time by decode-row count, piecewise linear between its knots, plus costs linear in context and prefill shared
by every row count.

Why a table: on CPU the eager engine's step is not a line in the batch. The matmul kernels change with the row
count (one row is a matrix-vector product), and the idle-machine calibration profiled 8 decode rows at 62.7 ms
and 16 rows at 47.9 ms (docs/benchmarks.md); no linear form in rows follows that, and the server overheads
fitted over it then patched a wrong step model. The knots are the decode-row counts the data holds (counts with
few steps merged into their neighbours), so the table follows the data where it is and only interpolates between.
"""
from __future__ import annotations

import numpy as np

SHARED = ("decode_ctx", "prefill_tokens", "prefill_pairs", "prefill_chunks")
MIN_KNOT_POINTS = 5  # steps a knot needs; rarer row counts are merged into a neighbour's knot


def knot_groups(rows: np.ndarray, min_points: int = MIN_KNOT_POINTS) -> list[list[int]]:
    """Distinct decode-row counts grouped in order so each group holds at least min_points steps (a short last
    group joins the one before)."""
    values, counts = np.unique(rows, return_counts=True)
    groups, cur, n = [], [], 0
    for v, c in zip(values.tolist(), counts.tolist()):
        cur.append(v)
        n += c
        if n >= min_points:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        if groups:
            groups[-1] += cur
        else:
            groups.append(cur)
    return groups


def hat_weights(d: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Each row count's weights on the knots for linear interpolation: flat below the first knot, the last
    segment extended above the last (a larger batch than any timed costs more, at the last measured rate)."""
    w = np.zeros((len(d), len(knots)))
    if len(knots) == 1:
        w[:, 0] = 1.0
        return w
    for i, x in enumerate(d.tolist()):
        if x <= knots[0]:
            w[i, 0] = 1.0
            continue
        j = min(int(np.searchsorted(knots, x)) - 1, len(knots) - 2)  # segment knots[j] .. knots[j+1]
        lam = (x - knots[j]) / (knots[j + 1] - knots[j])
        w[i, j], w[i, j + 1] = 1.0 - lam, lam
    return w


class TableModel:
    def __init__(self, rows: list[dict], y: np.ndarray, min_points: int = MIN_KNOT_POINTS):
        from frontierlm.sim.step_model import nnls

        d = np.array([r["decode_reqs"] for r in rows], dtype=float)
        groups = knot_groups(d, min_points)
        self.knots = np.array([float(np.mean(d[np.isin(d, g)])) for g in groups])
        self.shared = [f for f in SHARED if any(r[f] for r in rows)]  # terms the data never varies are left out
        x = self._design(rows)
        # weights of 1 / the knot group's median time: within a row count the fit is least squares (its mean,
        # which is what throughput adds up), across row counts each weighs by its relative error
        scale = np.empty(len(y))
        for g in groups:
            m = np.isin(d, g)
            scale[m] = np.median(y[m])
        w = 1.0 / np.maximum(scale, 1e-9)
        coef = nnls(x * w[:, None], y * w)
        self.values = coef[:len(self.knots)]
        self.coef = dict(zip(self.shared, coef[len(self.knots):].tolist()))
        self.rel_err = np.abs(self.predict_rows(rows) - y) / y

    def _design(self, rows: list[dict]) -> np.ndarray:
        d = np.array([r["decode_reqs"] for r in rows], dtype=float)
        extra = np.array([[r[f] for f in self.shared] for r in rows], dtype=float).reshape(len(rows), -1)
        return np.hstack([hat_weights(d, self.knots), extra])

    def predict_rows(self, rows: list[dict]) -> np.ndarray:
        return self._design(rows) @ np.concatenate([self.values, [self.coef[f] for f in self.shared]])

    def predict(self, values: dict) -> float:
        return float(max(self.predict_rows([values])[0], 0.0))

    def describe(self) -> dict:
        return {"knots_decode_rows": self.knots.tolist(), "knot_step_ms": (self.values * 1e3).tolist(),
                "shared_coef": self.coef}
