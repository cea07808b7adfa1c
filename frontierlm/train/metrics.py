"""Training metrics: a JSON log (one record per logged step and per evaluation) and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"


class MetricsLog:
    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def add(self, split: str, step: int, **values) -> dict:
        record = {"split": split, "step": step, **{k: _plain(v) for k, v in values.items()}}
        self.records.append(record)
        return record

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.records if r["split"] == split and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, split: str) -> dict | None:
        return next((r for r in reversed(self.records) if r["split"] == split), None)

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / METRICS_FILE
        path.write_text(json.dumps(self.records, indent=1) + "\n")
        return path

    def plot(self, out_dir: str | Path, title: str = "loss") -> Path:
        """Train and validation cross-entropy against the optimizer step (train `ce` when logged: the
        objective may add auxiliary or distillation terms that the validation loss does not have)."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        steps, losses = self.series("train", "ce")
        if not steps:
            steps, losses = self.series("train", "loss")
        if steps:
            ax.plot(steps, losses, label="train", linewidth=1)
        steps, losses = self.series("eval", "loss")
        if steps:
            ax.plot(steps, losses, "o-", label="validation", markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = Path(out_dir) / LOSS_CURVE_FILE
        fig.savefig(path)
        return path


def _plain(value):
    """Tensors and numpy scalars -> Python numbers, so the log is plain JSON."""
    if hasattr(value, "item"):
        return value.item()
    return value
