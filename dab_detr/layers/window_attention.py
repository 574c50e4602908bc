"""Multi-head self-attention inside non-overlapping windows, optionally shifted (Swin, Liu et
al., ICCV 2021), as DAT's local blocks compute it.

A map whose sides are not multiples of the window size is padded with zeros at the bottom and
right (as Swin's and DAT's detection code do) and cropped back; the shifted variant's mask is
built for the padded size.

Shapes: B batch, H x W map, C channels, h heads, w window side, N = w * w tokens per window,
nW windows per image. Maps are channels-last ``(B, H, W, C)``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .relative_position import WindowPositionBias

__all__ = ["WindowAttention", "shifted_window_mask"]

# the logit added between tokens of different regions of a shifted window: Swin's -100,
# not -inf, so that the official models' outputs are reproduced exactly
_OTHER_REGION = -100.0


def shifted_window_mask(size: Tuple[int, int], window: int, shift: int,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """``(nW, N, N)``: 0 between tokens that were neighbours before the map (``size``, padded
    to windows) was rolled by ``-shift``, -100 between tokens the roll brought together from
    opposite edges. Windows and tokens row-major.

    Along each axis of length n, Swin's three regions: [0, n - w), [n - w, n - s), [n - s, n).
    """
    height, width = size

    def regions(n: int) -> torch.Tensor:  # (n,) 0, 1 or 2
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    # (H, W) region of each token -> (nW, N) per window
    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = labels.view(height // window, window, width // window, window)
    labels = labels.transpose(1, 2).reshape(-1, window * window)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.where(differ, _OTHER_REGION, 0.0)


class WindowAttention(nn.Module):
    """Self-attention in ``w x w`` windows with a relative position bias (``shift`` > 0: the
    map rolled by ``-shift`` first and back after, with :func:`shifted_window_mask`).

    Submodules: ``qkv`` the packed input projection, ``proj`` the output projection,
    ``position_bias`` the :class:`WindowPositionBias`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{dim} channels do not split into {num_heads} heads")
        if not 0 <= shift < window_size:
            raise ValueError(f"shift {shift}: expected 0 (no shift) to {window_size - 1}")
        self.num_heads, self.window_size, self.shift = num_heads, window_size, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.position_bias = WindowPositionBias(window_size, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        b, height, width, c = x.shape
        w = self.window_size
        rows, cols = (height + w - 1) // w, (width + w - 1) // w  # windows per column, row
        hp, wp = rows * w, cols * w
        x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom and right
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        # (B, H, W, C) -> (B * nW, N, C): windows row-major, tokens row-major in each
        windows = x.view(b, rows, w, cols, w, c).transpose(2, 3).reshape(-1, w * w, c)
        # (B * nW, N, 3C) -> 3 x (B * nW, h, N, C / h)
        q, k, v = self.qkv(windows).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().to(q.dtype)  # (h, N, N)
        if self.shift:
            # (nW, N, N) per window of each image -> (B * nW, h, N, N)
            # made on the device for each map (cheap; a cache per size would grow with
            # multi-scale training's many sizes)
            mask = shifted_window_mask((hp, wp), w, self.shift, x.device).to(q.dtype)
            bias = (bias[None, None] + mask[None, :, None]).expand(b, -1, -1, -1, -1)
            bias = bias.reshape(-1, *bias.shape[2:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale C/h ** -0.5
        # (B * nW, h, N, C / h) -> (B, H, W, C)
        out = self.proj(out.transpose(1, 2).reshape(-1, w * w, c))
        out = out.view(b, rows, cols, w, w, c).transpose(2, 3).reshape(b, hp, wp, c)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        return out[:, :height, :width]
