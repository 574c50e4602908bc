"""Deformable DETR's encoder (Zhu et al., ICLR 2021): every token of every level attends, through
multi-scale deformable attention, to a few sampled points around its own position on each level.

Shapes: B batch, L levels, S = sum over levels of H_l * W_l tokens (level-major, row-major),
C channels. Positions are normalised to [0, 1] by each image's own (unpadded) extent.
"""

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import MSDeformAttn, SpatialShapes, level_shapes, post_norm_ffn

__all__ = [
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "encoder_reference_points",
    "valid_ratios",
]


def valid_ratios(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, 2)`` the unpadded fraction ``(w, h)`` of one level's map.

    Args:
        mask: ``(B, H, W)`` bool, True at padding (padding is at the bottom and right).
    """
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(
    spatial_shapes: SpatialShapes, ratios: torch.Tensor
) -> torch.Tensor:
    """Each token's centre, as seen from every level.

    Args:
        spatial_shapes: ``(H_l, W_l)`` per level (``SpatialShapes``).
        ratios: ``(B, L, 2)`` valid ratios ``(w, h)`` of each level.

    Returns:
        ``(B, S, L, 2)`` ``(x, y)``: the centre of token s in its image's unpadded extent
        (pixel centres ``(k + 0.5) / (valid part of the map)``), scaled by each level's valid
        ratio, i.e. in the padded coordinates of that level.
    """
    points = []
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        # 0.5, 1.5, ..., n - 0.5 (linspace's values; torch.export makes its count constant)
        ys = torch.arange(h, dtype=ratios.dtype, device=ratios.device) + 0.5
        xs = torch.arange(w, dtype=ratios.dtype, device=ratios.device) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")  # (H_l, W_l) each
        # (H_l * W_l,) -> (B, H_l * W_l): normalised by the image's valid extent on this level
        ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))  # (B, H_l * W_l, 2)
    # (B, S, 1, 2) * (B, 1, L, 2) -> (B, S, L, 2)
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then FFN. ``deformable_attention``: the
    implementation of the sampling (``MSDeformAttn``'s ``implementation``)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
        n_levels: int,
        n_points: int,
        deformable_attention: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, deformable_attention)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation()
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            src: ``(B, S, C)`` tokens of all levels.
            pos: ``(B, S, C)`` position encoding plus level embedding.
            reference_points: ``(B, S, L, 2)`` from :func:`encoder_reference_points`.
            spatial_shapes, level_start_index: ``(H_l, W_l)`` per level and ``(L,)``.
            padding_mask: ``(B, S)`` bool, True at padding, or None.

        Returns:
            ``(B, S, C)``.
        """
        p = self.dropout if self.training else 0.0
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + F.dropout(attn, p))
        return post_norm_ffn(src, self.linear1, self.linear2, self.activation, self.norm2, p)


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` over the flattened levels."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        ratios: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, S, C)``; ``ratios``: ``(B, L, 2)`` valid ratios; the rest as
        for the layers. Returns the memory, ``(B, S, C)``."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return src
