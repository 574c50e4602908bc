"""DAT's deformable attention (Xia et al., "Vision Transformer with Deformable Attention",
CVPR 2022, Sec. 3.3): every query of a map attends to one shared set of deformed keys.

A uniform grid of reference points, one per position of the map, is moved by offsets that a
small network predicts from the queries (per group of heads); the keys and values are read
at the moved points by bilinear interpolation of the block's input, and a relative position
bias is read from a learned table at the continuous query-to-key displacements
(:class:`~.relative_position.DisplacementPositionBias`). Unlike Deformable DETR's attention
(:mod:`.ms_deform_attn`: a few points per query, weights from the query alone), the keys are
shared by all queries and weighted by a full softmax over ``q . k``.

Shapes: B batch, H x W map (HW queries), C channels, h heads, G offset groups (h / G heads
each), n = H * W deformed keys. Maps are channels-last ``(B, H, W, C)``; locations are
``(y, x)`` in [-1, 1] over the map, -1 and 1 at the first and last pixels' centres
(``grid_sample``'s ``align_corners=True``).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .relative_position import DisplacementPositionBias

__all__ = ["DATAttention", "OffsetNetwork", "reference_grid"]


def reference_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(H, W, 2)`` ``(y, x)``: the centres ``(i + 0.5) / H * 2 - 1`` of an ``H x W`` map's
    cells, in ``like``'s dtype and device (the official DAT's reference points)."""
    ys = (torch.arange(height, dtype=like.dtype, device=like.device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


class OffsetNetwork(nn.Module):
    """The offsets of one group's reference points from its queries: a depthwise convolution
    (``kernel_size``, stride 1, same padding), LayerNorm over channels, GELU and a linear map
    to ``(y, x)`` without bias (``dwconv``, ``norm``, ``proj``)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, 2, bias=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B', C', H, W)`` -> raw offsets ``(B', H, W, 2)`` ``(y, x)``."""
        x = self.dwconv(q).permute(0, 2, 3, 1)  # channels-last for the norm
        return self.proj(F.gelu(self.norm(x)))


class DATAttention(nn.Module):
    """Deformable attention over ``H x W`` deformed keys shared by all queries.

    Submodules: ``proj_q``, ``proj_k``, ``proj_v``, ``proj_out`` (linear over channels),
    ``offsets`` (the :class:`OffsetNetwork`, shared by the groups), ``position_bias``.
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, kernel_size: int,
                 offset_range_factor: float, table_size: Tuple[int, int]):
        """
        Args:
            dim: C.
            num_heads: h; a multiple of ``num_groups``.
            num_groups: G, the groups of channels (and heads) that move their points alone.
            kernel_size: the offset network's depthwise convolution.
            offset_range_factor: the offsets are ``tanh(raw) * factor`` cells of the map.
            table_size: ``(H', W')`` of the map the position-bias table is learned for.
        """
        super().__init__()
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f"DAT attention: {dim} channels, {num_heads} heads and "
                             f"{num_groups} groups: expected heads | channels, groups | heads")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.offset_range_factor = offset_range_factor
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.offsets = OffsetNetwork(dim // num_groups, kernel_size)
        self.position_bias = DisplacementPositionBias(num_heads, table_size)

    def sampling_locations(self, q: torch.Tensor,
                           grid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q`` ``(B, H, W, C)`` -> the deformed points ``(B, G, H, W, 2)`` ``(y, x)``
        (``grid``: the ``(H, W, 2)`` reference grid, if already made):
        reference grid + ``tanh(offset) * factor`` cells, not clamped; float32 at least (under
        autocast too: a bfloat16 location near 1 is off by up to a quarter of a cell)."""
        b, height, width, c = q.shape
        g = self.num_groups
        # (B, H, W, C) -> (B * G, C / G, H, W): each group's channels, as its own image
        q_groups = q.view(b, height, width, g, c // g).permute(0, 3, 4, 1, 2).flatten(0, 1)
        raw = self.offsets(q_groups)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        # one cell of an H-row map is 2 / H in [-1, 1]: (y, x) scaled by (1 / H, 1 / W) * factor
        # (Python numbers, not a tensor: no host-to-device copy)
        moved = raw.tanh() * self.offset_range_factor
        offset = torch.stack((moved[..., 0] / height, moved[..., 1] / width), dim=-1)
        if grid is None:
            grid = reference_grid(height, width, raw)
        return (grid + offset).view(b, g, height, width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)``. The deformed points of an input are
        ``sampling_locations(proj_q(x))``."""
        b, height, width, c = x.shape
        g, h = self.num_groups, self.num_heads
        q = self.proj_q(x)
        # (H, W, 2): the reference points, which are also the queries' locations
        grid = reference_grid(height, width, x.new_empty((), dtype=torch.promote_types(
            x.dtype, torch.float32)))
        points = self.sampling_locations(q, grid)
        # keys and values are read from the input (not from q), each group at its points:
        # (B, H, W, C) -> (B * G, C / G, H, W), sampled at (B * G, H, W, 2) (x, y)
        x_groups = x.view(b, height, width, g, c // g).permute(0, 3, 4, 1, 2).flatten(0, 1)
        sampled = F.grid_sample(x_groups.to(points.dtype), points.flatten(0, 1).flip(-1),
                                mode="bilinear", align_corners=True).to(x.dtype)
        # (B * G, C / G, H, W) -> (B, n, C): the n deformed keys' features, all channels
        sampled = sampled.view(b, c, height * width).transpose(1, 2)
        # (B, N, C) -> (B, h, N, C / h): heads are consecutive channel blocks
        q, k, v = (t.view(b, -1, h, c // h).transpose(1, 2)
                   for t in (q.view(b, -1, c), self.proj_k(sampled), self.proj_v(sampled)))
        # (B, G, HW, n, 2): each query's location minus each key's, halved as the table wants
        queries = grid.view(1, 1, -1, 1, 2)
        displacement = (queries - points.view(b, g, 1, -1, 2)) * 0.5
        bias = self.position_bias(displacement, (height, width))  # (B, h, HW, n)
        # (B, h, HW, C / h); SDPA's float mask takes the queries' dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        # (merging the heads first, then splitting the tokens: one reshape that splits HW
        # fails in the ONNX export's decomposition)
        out = out.transpose(1, 2).reshape(b, height * width, c).view(b, height, width, c)
        return self.proj_out(out)
