"""Relative position biases of vision transformers' attention: the table of a window's
integer displacements (Swin; DAT's window blocks), and DAT's table read at continuous
query-to-key displacements.

Shapes: h heads, N = w * w tokens of a w x w window, HW queries of an H x W map, n keys.
Displacements are normalised as the keys' locations: [-1, 1] spans the map.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DisplacementPositionBias", "WindowPositionBias", "resize_displacement_table"]


class WindowPositionBias(nn.Module):
    """A learned bias per head for each of the ``(2w - 1)^2`` displacements between two tokens
    of a ``w x w`` window, added to the attention logits (Swin, Liu et al., ICCV 2021)."""

    def __init__(self, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        # (2w - 1)^2 rows, one per displacement, row (dy + w - 1) * (2w - 1) + (dx + w - 1)
        self.table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.table, std=0.01)
        ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()  # (N,) row-major
        # (N, N): query minus key displacement of each pair, as a row of the table
        dy = ys[:, None] - ys[None, :] + window_size - 1
        dx = xs[:, None] - xs[None, :] + window_size - 1
        self.register_buffer("index", dy * (2 * window_size - 1) + dx, persistent=False)

    def forward(self) -> torch.Tensor:
        """``(h, N, N)``: the bias of each head, query and key of a window."""
        n = self.index.shape[0]
        return self.table[self.index.flatten()].view(n, n, -1).permute(2, 0, 1)


def resize_displacement_table(table: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``table`` ``(h, 2H' - 1, 2W' - 1)``, learned on an ``H' x W'`` map, for an ``H x W``
    map: ``size`` = ``(2H - 1, 2W - 1)``. The official DAT's rule for other resolutions
    (``DAT.load_pretrained``): bicubic interpolation, ``align_corners=False``; unchanged when
    the sizes agree (where the sizes are symbolic, as in an export, it interpolates anyway:
    bicubic to the same size is the identity, and a comparison would fix the sizes)."""
    if all(isinstance(n, int) for n in size) and tuple(table.shape[-2:]) == tuple(size):
        return table
    return F.interpolate(table[None], size=size, mode="bicubic", align_corners=False)[0]


class DisplacementPositionBias(nn.Module):
    """DAT's bias (Xia et al., CVPR 2022, Sec. 3.3): a table ``(h, 2H - 1, 2W - 1)`` over the
    displacements between positions of an ``H x W`` map, read bilinearly at each query's
    continuous displacement to each deformed key. Learned for one map size
    (``table_size``); another map reads the table resized by :func:`resize_displacement_table`.
    """

    def __init__(self, num_heads: int, table_size: Tuple[int, int]):
        super().__init__()
        height, width = table_size
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * height - 1, 2 * width - 1))
        nn.init.trunc_normal_(self.table, std=0.01)

    def forward(self, displacement: torch.Tensor, map_size: Tuple[int, int]) -> torch.Tensor:
        """
        Args:
            displacement: ``(B, G, HW, n, 2)`` ``(y, x)``, query location minus key location
                halved (so in [-1, 1] for keys inside the map), per group G of heads.
            map_size: ``(H, W)`` of the query map.

        Returns:
            ``(B, h, HW, n)``: each head's bias, the heads of group g being the g-th block.
        """
        b, groups, hw, n, _ = displacement.shape
        height, width = map_size
        table = resize_displacement_table(self.table, (2 * height - 1, 2 * width - 1))
        # (h, 2H-1, 2W-1) -> (B * G, h / G, 2H-1, 2W-1): each group reads its heads' tables
        table = table.to(displacement.dtype).expand(b, -1, -1, -1)
        table = table.reshape(b * groups, -1, *table.shape[-2:])
        # grid_sample wants (x, y); align_corners: -1 and 1 are the tables' end entries
        bias = F.grid_sample(table, displacement.reshape(b * groups, hw, n, 2).flip(-1),
                             mode="bilinear", align_corners=True)
        return bias.reshape(b, -1, hw, n)  # (B * G, h / G, HW, n) -> (B, h, HW, n)
