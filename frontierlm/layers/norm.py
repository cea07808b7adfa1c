"""RMSNorm, with the residual add fused in (the decoder layer calls it as norm(x, residual))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; same math as below when no casts are involved
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 and cast back before the weight, exactly like transformers' LlamaRMSNorm.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual) for the next sublayer."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
