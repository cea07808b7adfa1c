"""Token embedding and the LM head (which may share the embedding's weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.layers.linear import default_weight_loader, linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> float32 logits. With tied embeddings the model points `weight` at the embedding's."""

    quant_method = None  # frontierlm/quant/linear_methods.py: an untied head may hold quantized weights

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.output_size = hidden_size, vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.weight.weight_loader = default_weight_loader

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, hidden_states, None).float()
        return linear(hidden_states, self.weight).float()
