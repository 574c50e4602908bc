"""DAB-DETR's encoder: DETR's post-norm encoder whose position encoding is scaled, per layer,
by an MLP of the current tokens.

Shapes: B batch, HW tokens, C channels (d_model).
"""

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import MLP, EncoderSelfAttention, post_norm_ffn

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention with positions on queries and keys, then FFN."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
    ):
        super().__init__()
        self.self_attn = EncoderSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = activation()
        self.dropout = dropout

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, HW, C)``; ``attn_mask``: ``(B, 1, 1, HW)``. Returns
        ``(B, HW, C)``."""
        p = self.dropout if self.training else 0.0
        src = self.norm1(src + F.dropout(self.self_attn(src, pos, attn_mask), p))
        return post_norm_ffn(src, self.linear1, self.linear2, self.activation, self.norm2, p)


class TransformerEncoder(nn.Module):
    """Encoder whose position encoding is scaled, per layer, by an MLP of the current tokens."""

    def __init__(self, layers: nn.ModuleList, d_model: int):
        super().__init__()
        self.layers = layers
        # without layers (ENC_LAYERS 0) there is nothing to scale: no parameters left unused
        self.query_scale = MLP(d_model, d_model, d_model, 2) if len(layers) else None

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, HW, C)``. Returns the memory, ``(B, HW, C)``."""
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), attn_mask)
        return src
