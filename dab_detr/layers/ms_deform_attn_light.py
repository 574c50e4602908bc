"""Multi-scale deformable attention that keeps no samples for the backward pass, in plain
PyTorch: the memory-light implementation behind ``multi_scale_deformable_attention``.

The forward is one ``F.embedding_bag`` per level: each (batch item, query, head) is a bag of
4 P rows of the value (the four bilinear corners of its P points), weighted by bilinear
weight times attention weight, out-of-map corners weighing zero. Nothing but the inputs is
kept. The backward recomputes, level by level: the value and location gradients come from
``grid_sampler_2d_backward`` (the reference's own backward, so they equal the reference's),
the attention weights' gradient from the level's samples, made again by an
``F.embedding_bag`` of four-corner bags and dropped with the level.

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points per head and
level, H_l x W_l the size of level l, S = sum_l H_l * W_l tokens, level-major, row-major.
Locations are normalised ``(x, y)``: pixel ``(i, j)`` of a level has its centre at
``((j + 0.5) / W_l, (i + 0.5) / H_l)`` (``grid_sample``'s ``align_corners=False``).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["light_deformable_attention"]

Shapes = List[Tuple[int, int]]


def _axis(coords: torch.Tensor, size: int) -> Tuple[torch.Tensor, ...]:
    """Bilinear corners along one axis of a level ``size`` pixels long.

    Args:
        coords: ``(B, Q, h, P)`` normalised coordinates along the axis.

    Returns:
        first and second corner's pixel index, clamped into the map, and their weights,
        zero where the corner falls outside the map; each ``(B, Q, h, P)``.
    """
    pixels = coords * size - 0.5
    floor = pixels.floor()
    frac = pixels - floor
    first = floor.to(torch.int64)
    # a clamped index equals itself only inside the map: validity and a safe index at once
    first_in, second_in = first.clamp(0, size - 1), (first + 1).clamp(0, size - 1)
    weight_first = (1 - frac) * (first_in == first)
    weight_second = frac * (second_in == first + 1)
    return first_in, second_in, weight_first, weight_second


def _level_bags(
    value_rows: int, shape: Tuple[int, int], start: int, heads: int,
    locations: torch.Tensor, weights: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``value.reshape(B * S * h, d)`` that one level's samples read, and how much.

    Args:
        value_rows: S * h, the rows of one batch item.
        shape: ``(H_l, W_l)``; start: the level's first token.
        locations: ``(B, Q, h, P, 2)`` normalised ``(x, y)`` in this level.
        weights: ``(B, Q, h, P)`` what each sample weighs, or None: 1.

    Returns:
        rows and coefficients ``(B, Q, h, P, 4)``: the corners (top-left, top-right,
        bottom-left, bottom-right) of each sample.
    """
    b = locations.shape[0]
    height, width = shape
    x0, x1, wx0, wx1 = _axis(locations[..., 0], width)
    y0, y1, wy0, wy1 = _axis(locations[..., 1], height)
    # row of token t of batch item n in head k: (n * S + t) * h + k, a (B, 1, h, 1) base
    base = (torch.arange(b, device=locations.device)[:, None] * value_rows
            + torch.arange(heads, device=locations.device) + start * heads)[:, None, :, None]
    top, bottom = base + y0 * (width * heads), base + y1 * (width * heads)
    left, right = x0 * heads, x1 * heads
    rows = torch.stack([top + left, top + right, bottom + left, bottom + right], dim=-1)
    if weights is not None:
        wy0, wy1 = wy0 * weights, wy1 * weights
    coefficients = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)
    return rows, coefficients


def _level_starts(shapes: Shapes) -> List[int]:
    sizes = [hl * wl for hl, wl in shapes]
    return [sum(sizes[:level]) for level in range(len(sizes))]


def _forward(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """``(B, Q, h * d)``: per level one bag of 4 P weighted rows per (item, query, head)."""
    b, s, heads, d = value.shape
    q = locations.shape[1]
    # (B, S, h, d) -> (B * S * h, d): a free view, one row per (item, token, head)
    table = value.reshape(b * s * heads, d)
    output = None
    for level, (shape, start) in enumerate(zip(shapes, _level_starts(shapes))):
        rows, coefficients = _level_bags(s * heads, shape, start, heads,
                                         locations[:, :, :, level], weights[:, :, :, level])
        # (B, Q, h, P, 4) -> (B * Q * h, 4 P): one bag per (item, query, head)
        bags = F.embedding_bag(rows.view(b * q * heads, -1), table, mode="sum",
                               per_sample_weights=coefficients.view(b * q * heads, -1))
        output = bags if output is None else output + bags
    # (B * Q * h, d) -> (B, Q, h * d)
    return output.view(b, q, heads * d)


def _level_grid_backward(
    g_image: torch.Tensor, image: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor,
    needs: Tuple[bool, bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One level's value and location gradients, by ``grid_sample``'s own backward.

    Args:
        g_image: ``(B * h, d, Q, 1)`` the output's gradient.
        image: ``(B * h, d, H_l, W_l)`` the level's value.
        locations: ``(B, Q, h, P, 2)``; weights: ``(B, Q, h, P)``.
        needs: whether the value's and the locations' gradients are wanted.

    Returns:
        ``(B * h, d, H_l, W_l)`` and ``(B, Q, h, P, 2)`` gradients, or None.
    """
    b, q, heads, p, _ = locations.shape
    # (B, Q, h, P, 2) -> (B, h, Q, P, 2) -> (B * h, Q, P, 2), in grid_sample's [-1, 1]
    grid = (2 * locations - 1).transpose(1, 2).reshape(b * heads, q, p, 2)
    # (B, Q, h, P) -> (B, h, Q, P) -> (B * h, 1, Q, P)
    a = weights.transpose(1, 2).reshape(b * heads, 1, q, p)
    # bilinear, zeros, align_corners=False: the reference's grid_sample
    grad_image, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        g_image * a, image, grid, 0, 0, False, list(needs))
    if not needs[1]:
        return grad_image, None
    # (B * h, Q, P, 2) -> (B, h, Q, P, 2) -> (B, Q, h, P, 2); the grid is 2 x - 1
    return grad_image, 2 * grad_grid.view(b, heads, q, p, 2).transpose(1, 2)


def _level_weight_grad(
    g: torch.Tensor, value: torch.Tensor, shape: Tuple[int, int], start: int,
    locations: torch.Tensor,
) -> torch.Tensor:
    """``(B, Q, h, P)``: one level's attention-weight gradient, each sample (made again)
    dotted with the output's gradient ``g`` ``(B, Q, h, d)``; ``locations``
    ``(B, Q, h, P, 2)``."""
    b, s, heads, d = value.shape
    q, p = locations.shape[1], locations.shape[3]
    rows, coefficients = _level_bags(s * heads, shape, start, heads, locations, None)
    # (B, Q, h, P, 4) -> (B Q h P, 4): one bag per sample; (B Q h P, d)
    samples = F.embedding_bag(rows.view(-1, 4), value.reshape(b * s * heads, d), mode="sum",
                              per_sample_weights=coefficients.view(-1, 4))
    # (B Q h, P, d) @ (B Q h, d, 1) -> (B, Q, h, P)
    return torch.bmm(samples.view(b * q * heads, p, d),
                     g.reshape(b * q * heads, d, 1)).view(b, q, heads, p)


def _backward(grad_output: torch.Tensor, value: torch.Tensor, shapes: Shapes,
              locations: torch.Tensor, weights: torch.Tensor, needs: Tuple[bool, bool, bool],
              ) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of value, locations and weights (None where not needed), level by level."""
    b, s, heads, d = value.shape
    q = locations.shape[1]
    # (B, Q, h * d) -> (B, Q, h, d)
    g = grad_output.reshape(b, q, heads, d)
    # (B, Q, h, d) -> (B, h, d, Q) -> (B * h, d, Q, 1): grid_sample's layout, broadcast over P
    g_image = g.permute(0, 2, 3, 1).reshape(b * heads, d, q, 1)
    grad_value = torch.zeros_like(value) if needs[0] else None
    grad_locations = torch.empty_like(locations) if needs[1] else None
    grad_weights = torch.empty_like(weights) if needs[2] else None
    for level, ((hl, wl), start) in enumerate(zip(shapes, _level_starts(shapes))):
        end = start + hl * wl
        if needs[0] or needs[1]:
            # (B, H_l W_l, h, d) -> (B, h, d, H_l W_l) -> (B * h, d, H_l, W_l)
            image = value[:, start:end].permute(0, 2, 3, 1).reshape(b * heads, d, hl, wl)
            grad_image, grad_level = _level_grid_backward(
                g_image, image, locations[:, :, :, level], weights[:, :, :, level], needs[:2])
            if needs[0]:
                # (B * h, d, H_l, W_l) -> (B, h, d, H_l W_l) -> (B, H_l W_l, h, d)
                grad_value[:, start:end] = grad_image.view(b, heads, d, -1).permute(0, 3, 1, 2)
            if needs[1]:
                grad_locations[:, :, :, level] = grad_level
            # freed before the next level's are made, not when the names are rebound
            del image, grad_image, grad_level
        if needs[2]:
            grad_weights[:, :, :, level] = _level_weight_grad(
                g, value, (hl, wl), start, locations[:, :, :, level])
    return grad_value, grad_locations, grad_weights


class _LightAttention(torch.autograd.Function):
    """The memory-light forward and backward; it saves its inputs only."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(value, locations, weights)
        ctx.shapes = shapes
        with torch.autocast(value.device.type, enabled=False):
            return _forward(value, shapes, locations, weights)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        value, locations, weights = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        with torch.autocast(value.device.type, enabled=False):
            grad_value, grad_locations, grad_weights = _backward(
                grad_output, value, ctx.shapes, locations, weights, needs)
        return grad_value, None, grad_locations, grad_weights


def light_deformable_attention(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention, memory-light (the arguments and result of
    ``multi_scale_deformable_attention``; ``shapes`` as Python ints). Computed in the wider
    of the value's and the locations' dtypes (float32 for a half-precision value); the result
    has the value's dtype."""
    dtype = torch.promote_types(value.dtype, locations.dtype)
    output = _LightAttention.apply(value.contiguous().to(dtype), shapes,
                                   locations.contiguous().to(dtype),
                                   weights.contiguous().to(dtype))
    return output.to(value.dtype)
