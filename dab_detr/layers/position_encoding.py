"""Sine position encodings of image positions and of anchor boxes.

Shapes: B batch, H x W feature map, Q queries, C channels (2 * ``num_pos_feats``).
"""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "box_sine_embedding", "sine_features"]


def sine_features(coords: torch.Tensor, num_pos_feats: int, temperature: float) -> torch.Tensor:
    """Interleaved sin/cos features of scalar coordinates.

    Args:
        coords: ``(...)`` coordinates, already scaled (by 2*pi for normalised positions).
        num_pos_feats: number of features per coordinate (even).
        temperature: base of the frequency decay; a smaller one gives sharper encodings.

    Returns:
        ``(..., num_pos_feats)``: ``sin(c / t^(2i/n)), cos(c / t^(2i/n))`` interleaved.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = coords[..., None] / dim_t
    # stack (..., n/2, 2) then flatten: sin and cos alternate along the last axis
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding of image positions with separate temperatures for y and x.

    Positions are the cumulative count of unpadded pixels along each axis, normalised by the
    image's own extent, so an image gets the same encoding whatever it is batched with.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ):
        """
        Args:
            num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
            temperature_h: temperature of the y encoding.
            temperature_w: temperature of the x encoding.
            scale: normalised positions in (0, 1] are multiplied by it.
            offset: added to the pixel count before normalising: 0 encodes pixel k (from 1)
                as k / n (DETR, DAB-DETR), -0.5 as its centre (k - 0.5) / n (Deformable DETR).
        """
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = scale
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: ``(B, H, W)`` bool, True at padded positions.

        Returns:
            ``(B, 2 * num_pos_feats, H, W)`` float32: ``cat(pos_y, pos_x)`` along channels.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = sine_features(y_embed, self.num_pos_feats, self.temperature_h)
        pos_x = sine_features(x_embed, self.num_pos_feats, self.temperature_w)
        # (B, H, W, 2 * num_pos_feats) -> (B, C, H, W)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(
    boxes: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0
) -> torch.Tensor:
    """Sine embedding of anchors, in the order (y, x, w, h) of the reference implementation.

    Args:
        boxes: ``(..., D)`` anchors normalised to [0, 1]: D = 4 for cxcywh boxes, 2 for points.
        num_pos_feats: features per coordinate.
        temperature: base of the frequency decay (10000 in the reference implementation).

    Returns:
        ``(..., D * num_pos_feats)``: ``cat(pos_y, pos_x[, pos_w, pos_h])``.
    """
    embed = sine_features(boxes * (2 * math.pi), num_pos_feats, temperature)  # (..., D, n)
    # y before x, as the image encoding orders its channels
    order = [1, 0] + list(range(2, boxes.shape[-1]))
    return embed[..., order, :].flatten(-2)
