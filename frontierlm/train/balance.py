"""MoE routing balance while training: the load-balancing loss coefficient, DeepSeek-V3's auxiliary-loss-free
bias updates, and the per-expert token shares logged at each evaluation.

Counts come from `MoE.last_counts` (set by every training forward, MTP modules included) and are summed over
the micro-batches of an optimizer step and over data-parallel ranks, so every rank applies the same bias update
and the logged shares cover the whole global batch.
"""
from __future__ import annotations

import torch
from torch import nn

from frontierlm.layers.moe import MoE


class ExpertBalance:
    def __init__(self, model: nn.Module, aux_loss_coef: float = 0.0, bias_update_speed: float = 0.0):
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.names = [name for name, _ in named]
        self.layers = [m for _, m in named]
        if (aux_loss_coef > 0 or bias_update_speed > 0) and not self.layers:
            raise ValueError("optim.moe_aux_loss_coef / optim.moe_bias_update_speed: the model has no MoE layers")
        if bias_update_speed > 0 and any(getattr(m.gate, "e_score_correction_bias", None) is None
                                         for m in self.layers):
            raise ValueError("optim.moe_bias_update_speed needs MoE routers with a correction bias (DeepSeek-V3)")
        for m in self.layers:
            m.aux_loss_coef = aux_loss_coef
        self.gamma = bias_update_speed
        self.sizes = [m.routing.num_experts for m in self.layers]
        device = next(model.parameters()).device
        # Flat over layers (one all-reduce): tokens routed to each expert in this step / since the last report.
        self._step = torch.zeros(sum(self.sizes), dtype=torch.int64, device=device)
        self._window = torch.zeros_like(self._step)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def collect(self) -> None:
        """After each training micro-batch: add every MoE layer's routed counts to this step's."""
        start = 0
        for m, size in zip(self.layers, self.sizes):
            if m.last_counts is not None:
                self._step[start:start + size] += m.last_counts
                m.last_counts = None  # counted once, even if a later micro-batch skips this layer
            start += size

    def step(self, dist) -> None:
        """After each optimizer step (on every rank): sum the step's counts over ranks, then nudge the
        correction biases when aux-loss-free balancing is on."""
        if not self.layers:
            return
        counts = dist.all_reduce_sum(self._step)
        if self.gamma > 0:
            for m, layer_counts in zip(self.layers, counts.split(self.sizes)):
                m.last_counts = layer_counts  # update_correction_bias balances what last_counts says
                m.update_correction_bias(self.gamma)
                m.last_counts = None
        self._window += counts
        self._step.zero_()

    def report(self) -> dict:
        """Per MoE layer since the last report: each expert's share of the routed tokens, and the imbalance
        max load / mean load (1 = balanced, num_experts = collapsed onto one expert); {} before any step."""
        if not self.layers or int(self._window.sum()) == 0:
            return {}
        shares, imbalance = {}, {}
        for name, counts in zip(self.names, self._window.double().cpu().split(self.sizes)):
            total = float(counts.sum())
            shares[name] = [round(float(c) / total, 5) for c in counts] if total else [0.0] * len(counts)
            imbalance[name] = float(counts.max() / counts.mean()) if total else 0.0
        self._window.zero_()
        return {"expert_share": shares, "expert_imbalance": imbalance,
                "expert_imbalance_max": max(imbalance.values())}
