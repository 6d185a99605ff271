"""What every family adapter shares: the dimensions it reports and left padding."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding keeps every row's last token at the last position, which generation and span slicing rely on."""
    t = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), t), dtype=torch.long)
    for b, row in enumerate(ids):
        if row:
            input_ids[b, t - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, t - len(row):] = 1
    # Positions count real tokens only: Mistral's forward would otherwise number the padding too, and a
    # padded row would not equal the same row alone (generate() computes them the same way).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
