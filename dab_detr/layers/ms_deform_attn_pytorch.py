"""Multi-scale deformable attention with one ``grid_sample`` per level, in plain PyTorch: the
reference implementation behind ``multi_scale_deformable_attention`` (Deformable DETR's
``ms_deform_attn_core_pytorch``), and the one that exports. Autograd keeps every level's
samples for the backward pass.

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points per head and
level, H_l x W_l the size of level l, S = sum_l H_l * W_l tokens, level-major, row-major.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["grid_sample_deformable_attention"]


def grid_sample_deformable_attention(
    value: torch.Tensor,
    shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention, the reference: one ``grid_sample`` per level covers
    all batch items, heads, queries and points (the arguments and result of
    ``multi_scale_deformable_attention``; ``shapes`` as Python ints)."""
    b, _, n_heads, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    out_dtype = value.dtype
    # grid_sample takes one dtype: a half-precision value is sampled in the locations' float32
    value = value.to(torch.promote_types(value.dtype, sampling_locations.dtype))
    # (B, S, h, d) -> L x (B, H_l * W_l, h, d)
    value_per_level = value.split([hl * wl for hl, wl in shapes], dim=1)
    # grid_sample's grid spans [-1, 1] over the map
    grids = (2 * sampling_locations - 1).to(value.dtype)
    # (B, Q, h, L, P) -> (B, h, L, Q, P) -> (B * h, L, 1, Q, P): per level, broadcast over d
    weights = attention_weights.to(value.dtype).permute(0, 2, 3, 1, 4).reshape(
        b * n_heads, n_levels, 1, q, n_points
    )
    output = value.new_zeros(b * n_heads, d, q)
    for level, (hl, wl) in enumerate(shapes):
        # (B, H_l * W_l, h, d) -> (B, h, d, H_l * W_l) -> (B * h, d, H_l, W_l): heads join the
        # batch, tokens become a row-major image
        v = value_per_level[level].permute(0, 2, 3, 1).reshape(b * n_heads, d, hl, wl)
        # (B, Q, h, P, 2) -> (B, h, Q, P, 2) -> (B * h, Q, P, 2): the same batch order as v
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * n_heads, q, n_points, 2)
        # (B * h, d, Q, P)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        # weighted sum over the level's points, accumulated over levels: (B * h, d, Q). A
        # product and a sum: on CPU about twice as fast, forward and backward, as stacking the
        # levels and contracting with einsum (a batch of tiny matrix products).
        output = output + (sampled * weights[:, level]).sum(-1)
    # (B * h, d, Q) -> (B, h * d, Q) -> (B, Q, h * d)
    return output.view(b, n_heads * d, q).transpose(1, 2).contiguous().to(out_dtype)
