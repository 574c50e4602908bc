"""Multi-head self-attention inside non-overlapping windows, optionally shifted (Swin, Liu et
al., ICCV 2021), as DAT's local blocks compute it.

A map whose sides are not multiples of the window size is padded with zeros at the bottom and
right (as Swin's and DAT's detection code do) and cropped back; the shifted variant's mask is
built for the padded size. Padding, rolling and partitioning are done by one gather of the
tokens (:func:`window_indices`), their inverse by another.

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


def _regions(i: torch.Tensor, n: int, window: int, shift: int) -> torch.Tensor:
    """Swin's region (0, 1, 2) of positions ``i`` along an axis of ``n``: [0, n - w),
    [n - w, n - s), [n - s, n)."""
    return (i >= n - window).long() + (i >= n - shift).long()


def shifted_window_mask(size: Tuple[int, int], window: int, shift: int,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """``(nW, N, N)``: 0 between tokens that were neighbours before the map (``size``, padded
    to windows) was rolled by ``-shift``, -100 between tokens the roll brought together from
    opposite edges. Windows and tokens row-major."""
    return _region_mask(window_indices(size, window, shift, device)[2])


def _region_mask(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` ``(nW, N)`` regions -> ``(nW, N, N)``: -100 between tokens of different ones."""
    return torch.where(labels[:, None, :] != labels[:, :, None], _OTHER_REGION, 0.0)


def _wrap(i: torch.Tensor, n: int) -> torch.Tensor:
    """``i % n`` for ``i`` in [0, 2n)."""
    return torch.where(i >= n, i - n, i)


def window_indices(
    size: Tuple[int, int], window: int, shift: int, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the windows of an ``H x W`` map (padded to windows, rolled by ``-shift``) read
    their tokens, where each token finds its output, and the regions of the shifted windows.

    Index arithmetic rather than pad, roll, reshape and crop: the same tokens in the same
    order, and no size-dependent view, so that an export keeps the sizes symbolic.

    Returns:
        ``gather`` ``(nW * N,)``: the token ``y * W + x`` at each window position (windows
        and their tokens row-major), ``H * W`` (a zero token) in the padding;
        ``scatter`` ``(H * W,)``: the window position of each token;
        ``labels`` ``(nW, N)``: each window position's region (Swin's 3 x 3), for the mask.
    """
    height, width = size
    n = window * window
    cols = (width + window - 1) // window
    hp, wp = (height + window - 1) // window * window, cols * window
    # (no modulo by a size, which the ONNX export cannot express: quotients and wraps instead)
    p = torch.arange(hp * wp, device=device)  # window positions
    k, t = p // n, p % n  # window, token in it
    row = k // cols
    ry = row * window + t // window  # where it is in the rolled, padded map
    rx = (k - row * cols) * window + t % window
    oy, ox = _wrap(ry + shift, hp), _wrap(rx + shift, wp)  # where the roll took it from
    gather = torch.where((oy < height) & (ox < width), oy * width + ox, height * width)
    labels = (_regions(ry, hp, window, shift) * 3 + _regions(rx, wp, window, shift)).view(-1, n)
    j = torch.arange(height * width, device=device)  # tokens
    y = j // width
    # where the roll puts them
    ty, tx = _wrap(y - shift + hp, hp), _wrap(j - y * width - shift + wp, wp)
    scatter = (ty // window * cols + tx // window) * n + ty % window * window + tx % window
    return gather, scatter, labels


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
        w, n = self.window_size, self.window_size**2
        gather, scatter, labels = window_indices((height, width), w, self.shift, x.device)
        # (B, H, W, C) -> (B * nW, N, C), windows and tokens row-major; the padding (zeros, as
        # Swin pads) is the appended token H * W
        tokens = torch.cat([x.reshape(b, height * width, c), x.new_zeros(b, 1, c)], dim=1)
        windows = tokens.index_select(1, gather).view(-1, n, c)
        # (B * nW, N, 3C) -> 3 x (B * nW, h, N, C / h)
        q, k, v = self.qkv(windows).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().to(q.dtype)  # (h, N, N)
        if self.shift:
            # (nW, N, N): -100 between regions -> (B * nW, h, N, N)
            mask = _region_mask(labels)
            bias = (bias[None, None] + mask.to(q.dtype)[None, :, None]).expand(b, -1, -1, -1, -1)
            bias = bias.reshape(-1, *bias.shape[2:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale C/h ** -0.5
        # (B * nW, h, N, C / h) -> (B, nW * N, C) -> each token's output: (B, H, W, C)
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c)).view(b, -1, c)
        return out.index_select(1, scatter).view(b, height, width, c)
