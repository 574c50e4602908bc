"""DETR's post-norm encoder, and DAB-DETR's, whose position encoding is scaled, per layer, by
an MLP of the current tokens.

Shapes: B batch, HW tokens, C channels (d_model).
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import MLP, EncoderSelfAttention, key_padding_to_attn_mask, post_norm_ffn

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
    """Encoder layers over the image tokens; with ``scale_position`` (DAB-DETR) each layer's
    position encoding is scaled by an MLP of its input tokens, without it (DETR, Conditional
    DETR) every layer adds the encoding as it is."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
        scale_position: bool = True,
    ):
        """
        Args:
            d_model, nhead, dim_feedforward, dropout, activation: of each
                ``TransformerEncoderLayer``.
            num_layers: depth (0: the memory is the projected feature map itself).
            scale_position: DAB-DETR's ``query_scale`` of the position encoding.
        """
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        )
        # without layers (ENC_LAYERS 0) there is nothing to scale: no parameters left unused
        scaled = scale_position and num_layers > 0
        self.query_scale = MLP(d_model, d_model, d_model, 2) if scaled else None

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, HW, C)``. Returns the memory, ``(B, HW, C)``."""
        for layer in self.layers:
            scaled = pos if self.query_scale is None else pos * self.query_scale(src)
            src = layer(src, scaled, attn_mask)
        return src

    def forward_map(
        self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder over a feature map, as the decoders take it.

        Args:
            src: ``(B, C, H, W)`` projected backbone features.
            mask: ``(B, H, W)`` bool, True at padded positions.
            pos: ``(B, C, H, W)`` image position encoding.

        Returns:
            memory ``(B, HW, C)``, the position encoding as tokens ``(B, HW, C)`` and the
            attention mask ``(B, 1, 1, HW)`` (True where a token may be attended).
        """
        # (B, C, H, W) -> (B, HW, C): tokens in row-major order, contiguous once here (a
        # no-op for channels-last maps) rather than copied by the linear layers that read them
        src = src.flatten(2).transpose(1, 2).contiguous()
        pos = pos.flatten(2).transpose(1, 2).contiguous()
        attn_mask = key_padding_to_attn_mask(mask.flatten(1))
        return self(src, pos, attn_mask), pos, attn_mask
