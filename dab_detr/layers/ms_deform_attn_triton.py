"""Multi-scale deformable attention as Triton kernels, forward and backward: the GPU
implementation behind ``multi_scale_deformable_attention``.

One program takes a block of queries of one (batch item, head) and all d channels: for each
level and point it loads the locations and the weight, then the four bilinear corners' rows
of the value (masked to zero outside the map), accumulating in float32. The backward walks
the same samples: the location and weight gradients are sums over the channels, finished
inside the program; the value's gradient is scattered with atomic adds into a float32 buffer.
The value may be half precision; locations and weights are float32.

Importing this module imports ``triton``; ``ms_deform_attn`` imports it only when the Triton
implementation is used. With ``TRITON_INTERPRET=1`` set before the import, the kernels run in
Triton's interpreter on CPU tensors (slowly but exactly: the tests use it).

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points per head and
level, S = sum_l H_l * W_l tokens, level-major, row-major. Locations are normalised
``(x, y)`` with ``grid_sample``'s ``align_corners=False`` pixel centres.
"""

import os
from typing import List, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["triton_deformable_attention"]


@triton.jit
def _sample_setup(loc_ptr, attn_ptr, sample, mask, height, width):
    """Pixel coordinates of a block of samples: the top-left corner, the fractions and the
    attention weight, each ``(BLOCK_Q,)``."""
    x = tl.load(loc_ptr + 2 * sample, mask=mask, other=0.0).to(tl.float32) * width - 0.5
    y = tl.load(loc_ptr + 2 * sample + 1, mask=mask, other=0.0).to(tl.float32) * height - 0.5
    a = tl.load(attn_ptr + sample, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0, a


@triton.jit
def _corner_offsets(xi, yi, mask, height, width, row_base, heads, channels, d_range, d_mask):
    """Element offsets ``(BLOCK_Q, BLOCK_D)`` of one corner's value row and where it is
    in the map."""
    valid = mask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    row = row_base + (yi * width + xi).to(tl.int64) * heads
    offsets = row[:, None] * channels + d_range[None, :]
    return offsets, valid[:, None] & d_mask[None, :]


@triton.jit
def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                    tokens, queries, heads: tl.constexpr, channels: tl.constexpr,
                    levels: tl.constexpr, points: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    item_head = tl.program_id(1)
    item = item_head // heads
    head = item_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = q < queries
    d_range = tl.arange(0, BLOCK_D)
    d_mask = d_range < channels
    # (B, Q, h) index of each query's head: its samples are the next L * P
    query_head = (item * queries + q).to(tl.int64) * heads + head
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        # row of the level's first token in (B * S * h, d)
        row_base = (item.to(tl.int64) * tokens + tl.load(starts_ptr + level)) * heads + head
        for point in tl.static_range(points):
            sample = query_head * (levels * points) + level * points + point
            x0, y0, fx, fy, a = _sample_setup(loc_ptr, attn_ptr, sample, mask, height, width)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                weight = a * (fx if dx == 1 else 1 - fx) * (fy if dy == 1 else 1 - fy)
                offsets, valid = _corner_offsets(x0 + dx, y0 + dy, mask, height, width,
                                                 row_base, heads, channels, d_range, d_mask)
                v = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
                acc += weight[:, None] * v
    out_offsets = query_head[:, None] * channels + d_range[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=mask[:, None] & d_mask[None, :])


@triton.jit
def _backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                     tokens, queries, heads: tl.constexpr, channels: tl.constexpr,
                     levels: tl.constexpr, points: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    item_head = tl.program_id(1)
    item = item_head // heads
    head = item_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = q < queries
    d_range = tl.arange(0, BLOCK_D)
    d_mask = d_range < channels
    query_head = (item * queries + q).to(tl.int64) * heads + head
    g_offsets = query_head[:, None] * channels + d_range[None, :]
    g = tl.load(grad_out_ptr + g_offsets, mask=mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    for level in tl.static_range(levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        row_base = (item.to(tl.int64) * tokens + tl.load(starts_ptr + level)) * heads + head
        for point in tl.static_range(points):
            sample = query_head * (levels * points) + level * points + point
            x0, y0, fx, fy, a = _sample_setup(loc_ptr, attn_ptr, sample, mask, height, width)
            grad_a = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_fx = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_fy = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                wx = fx if dx == 1 else 1 - fx
                wy = fy if dy == 1 else 1 - fy
                offsets, valid = _corner_offsets(x0 + dx, y0 + dy, mask, height, width,
                                                 row_base, heads, channels, d_range, d_mask)
                v = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
                # the corner's value against the output's gradient, summed over channels
                gv = tl.sum(g * v, axis=1)
                grad_a += wx * wy * gv
                # d(wx)/d(fx) is +1 for the right corners, -1 for the left ones
                grad_fx += (1.0 if dx == 1 else -1.0) * wy * gv
                grad_fy += (1.0 if dy == 1 else -1.0) * wx * gv
                tl.atomic_add(grad_value_ptr + offsets, (a * wx * wy)[:, None] * g, mask=valid)
            tl.store(grad_attn_ptr + sample, grad_a, mask=mask)
            # x = loc_x * W_l - 0.5: d/d(loc_x) = W_l d/dx
            tl.store(grad_loc_ptr + 2 * sample, a * grad_fx * width, mask=mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, a * grad_fy * height, mask=mask)


def _launch_config(queries: int, channels: int, batch_heads: int) -> Tuple[int, int, Tuple]:
    """``BLOCK_Q``, ``BLOCK_D`` and the grid: all channels in one program, queries in blocks
    of about 2048 elements (at least 16 queries) on a GPU. The interpreter runs one program
    after the other at a cost per operation, not per element: there, blocks of up to 1024
    queries, the fewer programs the faster."""
    block_d = triton.next_power_of_2(channels)
    if os.environ.get("TRITON_INTERPRET") == "1":
        block_q = min(1024, triton.next_power_of_2(queries))
    else:
        block_q = max(16, min(64, 2048 // block_d))
    return block_q, block_d, (triton.cdiv(queries, block_q), batch_heads)


def _level_tensors(shapes: List[Tuple[int, int]], device: torch.device
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L, 2)`` int32 ``(H_l, W_l)`` and ``(L,)`` int32 first tokens, on ``device``."""
    sizes = [hl * wl for hl, wl in shapes]
    starts = [sum(sizes[:level]) for level in range(len(sizes))]
    # made on the host, copied without waiting (a blocking copy would synchronise)
    return (torch.tensor(shapes, dtype=torch.int32).to(device, non_blocking=True),
            torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True))


class _TritonAttention(torch.autograd.Function):
    """The kernels as an autograd function; it saves its inputs only."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, shapes: List[Tuple[int, int]],
                locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b, s, heads, d = value.shape
        q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        shapes_t, starts_t = _level_tensors(shapes, value.device)
        output = value.new_empty(b, q, heads, d)
        block_q, block_d, grid = _launch_config(q, d, b * heads)
        _forward_kernel[grid](value, shapes_t, starts_t, locations, weights, output,
                              s, q, heads, d, levels, points, BLOCK_Q=block_q, BLOCK_D=block_d)
        ctx.save_for_backward(value, shapes_t, starts_t, locations, weights)
        # (B, Q, h, d) -> (B, Q, h * d)
        return output.view(b, q, heads * d)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        value, shapes_t, starts_t, locations, weights = ctx.saved_tensors
        b, s, heads, d = value.shape
        q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        # atomic adds in float32, whatever the value's precision
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_locations = torch.empty_like(locations)
        grad_weights = torch.empty_like(weights)
        block_q, block_d, grid = _launch_config(q, d, b * heads)
        _backward_kernel[grid](value, shapes_t, starts_t, locations, weights,
                               grad_output.contiguous(), grad_value, grad_locations,
                               grad_weights, s, q, heads, d, levels, points,
                               BLOCK_Q=block_q, BLOCK_D=block_d)
        return grad_value.to(value.dtype), None, grad_locations, grad_weights


def triton_deformable_attention(value: torch.Tensor, shapes: List[Tuple[int, int]],
                                locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention by the Triton kernels (the arguments and result of
    ``multi_scale_deformable_attention``; ``shapes`` as Python ints). Locations and weights
    are taken in float32 (float64 ones are rounded); the value keeps its precision, float32
    accumulation; the result has the value's dtype."""
    return _TritonAttention.apply(value.contiguous(), shapes,
                                  locations.contiguous().float(), weights.contiguous().float())
