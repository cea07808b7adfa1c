"""AdamW (weight decay on matrices only) and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from frontierlm.train.config import OptimSection


def lr_at(step: int, optim: OptimSection, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to optim.lr over warmup_steps, then
    cosine decay reaching optim.min_lr at the last step."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = total_steps - 1 - optim.warmup_steps
    if decay_steps <= 0:
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW; norms, biases and other 1-D parameters are not decayed (decaying a norm scale to 0 only hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor makes step s use lr_at(s); call scheduler.step() after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim, total_steps) / optim.lr)
