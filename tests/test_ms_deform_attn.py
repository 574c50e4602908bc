"""Multi-scale deformable attention: the core sampling against an explicit bilinear
interpolation (four neighbours, zeros outside the map, ``align_corners=False`` pixel centres),
its gradients, and the module's padding, reference-point and initialisation semantics.

Shapes: B batch, Q queries, C channels, h heads, d channels per head, L levels, P points,
S = sum_l H_l * W_l tokens.
"""

import math
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

from dab_detr.layers.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention

SHAPES = [(3, 4), (2, 2), (1, 3)]  # (H_l, W_l): different sizes, non-square
B, Q, HEADS, D, P = 2, 4, 2, 3, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(shape: Tuple[int, ...], low: float, high: float, gen: torch.Generator,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=dtype)


def _spatial_shapes(shapes: List[Tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(shapes, dtype=torch.long)


def _level_start_index(shapes: List[Tuple[int, int]]) -> torch.Tensor:
    sizes = torch.tensor([hl * wl for hl, wl in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _core_inputs(shapes, b, q, heads, d, p, gen, low=-0.3, high=1.3):
    """value ``(B, S, h, d)``, locations ``(B, Q, h, L, P, 2)`` in (low, high), weights
    ``(B, Q, h, L, P)`` summing to one over L * P."""
    s, n_levels = sum(hl * wl for hl, wl in shapes), len(shapes)
    value = torch.randn(b, s, heads, d, generator=gen, dtype=torch.float64)
    locations = _uniform((b, q, heads, n_levels, p, 2), low, high, gen)
    logits = torch.randn(b, q, heads, n_levels * p, generator=gen, dtype=torch.float64)
    weights = logits.softmax(-1).view(b, q, heads, n_levels, p)
    return value, locations, weights


def explicit_bilinear(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``image`` ``(H, W, d)`` at normalised ``(x, y)``: the four neighbouring pixels weighted
    bilinearly, pixels outside the map counting as zeros. Pixel (i, j) has its centre at
    normalised ``((j + 0.5) / W, (i + 0.5) / H)``."""
    height, width, _ = image.shape
    x_pix, y_pix = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(x_pix), math.floor(y_pix)
    out = image.new_zeros(image.shape[-1])
    for row, wy in ((y0, 1 - (y_pix - y0)), (y0 + 1, y_pix - y0)):
        for col, wx in ((x0, 1 - (x_pix - x0)), (x0 + 1, x_pix - x0)):
            if 0 <= row < height and 0 <= col < width:
                out = out + wy * wx * image[row, col]
    return out


def explicit_deformable_attention(value, shapes, locations, weights) -> torch.Tensor:
    """``(B, Q, h * d)``, one sample at a time."""
    b, q, heads, n_levels, p, _ = locations.shape
    d = value.shape[-1]
    out = value.new_zeros(b, q, heads, d)
    start = 0
    for level, (hl, wl) in enumerate(shapes):
        for n in range(b):
            for head in range(heads):
                image = value[n, start:start + hl * wl, head].reshape(hl, wl, d)
                for i in range(q):
                    for k in range(p):
                        x, y = locations[n, i, head, level, k].tolist()
                        sample = explicit_bilinear(image, x, y)
                        out[n, i, head] += weights[n, i, head, level, k] * sample
        start += hl * wl
    return out.reshape(b, q, heads * d)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_core_matches_explicit_bilinear(dtype: torch.dtype, tol: float) -> None:
    value, locations, weights = _core_inputs(SHAPES, B, Q, HEADS, D, P, _gen())
    # a point wholly outside, one straddling the left edge, one on the far corner
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.5, 2.0])
    locations[0, 1, 1, 1, 1] = torch.tensor([-0.1, 0.4])
    locations[1, 2, 0, 2, 2] = torch.tensor([1.0, 1.0])
    assert ((locations < 0) | (locations > 1)).any()
    expected = explicit_deformable_attention(value, SHAPES, locations, weights)
    out = multi_scale_deformable_attention(
        value.to(dtype), _spatial_shapes(SHAPES), locations.to(dtype), weights.to(dtype)
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=tol)


def test_core_one_grid_sample_per_level(monkeypatch: pytest.MonkeyPatch) -> None:
    grid_shapes = []
    grid_sample = F.grid_sample

    def recording_grid_sample(input, grid, **kwargs):
        grid_shapes.append((tuple(input.shape), tuple(grid.shape)))
        return grid_sample(input, grid, **kwargs)

    monkeypatch.setattr(F, "grid_sample", recording_grid_sample)
    value, locations, weights = _core_inputs(SHAPES, B, Q, HEADS, D, P, _gen())
    multi_scale_deformable_attention(value, _spatial_shapes(SHAPES), locations, weights)
    # heads join the batch: (B * h, d, H_l, W_l) images, (B * h, Q, P, 2) grids
    assert grid_shapes == [((B * HEADS, D, hl, wl), (B * HEADS, Q, P, 2)) for hl, wl in SHAPES]


def test_core_rejects_wrong_token_count() -> None:
    value, locations, weights = _core_inputs(SHAPES, B, Q, HEADS, D, P, _gen())
    with pytest.raises(ValueError, match="19 tokens"):
        multi_scale_deformable_attention(
            value[:, :-1], _spatial_shapes(SHAPES), locations, weights
        )


def test_core_gradcheck() -> None:
    shapes = [(2, 3), (1, 2)]
    # random locations stay away from the pixel grid, where bilinear has kinks
    value, locations, weights = _core_inputs(shapes, 1, 2, 2, 2, 2, _gen(1), -0.1, 1.1)
    spatial_shapes = _spatial_shapes(shapes)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))

    def core(v, loc, w):
        return multi_scale_deformable_attention(v, spatial_shapes, loc, w)

    assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-7)


def _module_inputs(module: MSDeformAttn, shapes, b: int, q: int, gen: torch.Generator):
    """query ``(B, Q, C)``, input ``(B, S, C)``, 2-d references ``(B, Q, L, 2)``; the query
    projections get random weights so that offsets and weights depend on the query."""
    c, s = module.d_model, sum(hl * wl for hl, wl in shapes)
    with torch.no_grad():
        for linear in (module.sampling_offsets, module.attention_weights):
            linear.weight.copy_(0.1 * torch.randn(linear.weight.shape, generator=gen))
    query = torch.randn(b, q, c, generator=gen, dtype=torch.float64)
    inputs = torch.randn(b, s, c, generator=gen, dtype=torch.float64)
    references = _uniform((b, q, len(shapes), 2), 0.1, 0.9, gen)
    return query, inputs, references


def _module(shapes, heads: int = 2, points: int = P, d_model: int = 8) -> MSDeformAttn:
    torch.manual_seed(0)
    return MSDeformAttn(d_model, len(shapes), heads, points).double()


def test_module_output_shape() -> None:
    module = _module(SHAPES)
    query, inputs, references = _module_inputs(module, SHAPES, B, Q, _gen())
    out = module(query, references, inputs, _spatial_shapes(SHAPES), _level_start_index(SHAPES))
    assert out.shape == (B, Q, module.d_model)


def test_module_ignores_padding_tokens() -> None:
    module = _module(SHAPES)
    gen = _gen()
    query, inputs, references = _module_inputs(module, SHAPES, B, Q, gen)
    # image 1 is padded on its right half in every level (image 0 not at all)
    mask = torch.cat(
        [torch.arange(wl).repeat(hl) >= wl // 2 for hl, wl in SHAPES]
    ).expand(B, -1).clone()
    mask[0] = False
    changed = inputs.clone()
    changed[mask] = torch.randn(int(mask.sum()), module.d_model, generator=gen,
                                dtype=torch.float64)
    args = (_spatial_shapes(SHAPES), _level_start_index(SHAPES))
    out = module(query, references, inputs, *args, mask)
    torch.testing.assert_close(module(query, references, changed, *args, mask), out,
                               rtol=0, atol=1e-12)
    # without the mask the same change shows: the padded tokens are sampled
    assert not torch.allclose(module(query, references, changed, *args),
                              module(query, references, inputs, *args))


def test_module_2d_reference_offsets_in_pixels() -> None:
    module = _module(SHAPES)
    query, inputs, references = _module_inputs(module, SHAPES, B, Q, _gen())
    n_levels, heads = len(SHAPES), module.n_heads
    # the steps, written out: offsets in pixels of each level, softmax over levels and points
    offsets = module.sampling_offsets(query).view(B, Q, heads, n_levels, P, 2)
    locations = torch.empty_like(offsets)
    for level, (hl, wl) in enumerate(SHAPES):
        ref = references[:, :, None, level, None, :]
        locations[:, :, :, level, :, 0] = ref[..., 0] + offsets[:, :, :, level, :, 0] / wl
        locations[:, :, :, level, :, 1] = ref[..., 1] + offsets[:, :, :, level, :, 1] / hl
    logits = module.attention_weights(query).view(B, Q, heads, n_levels * P)
    weights = logits.softmax(-1).view(B, Q, heads, n_levels, P)
    value = module.value_proj(inputs).view(B, -1, heads, module.d_model // heads)
    expected = module.output_proj(
        explicit_deformable_attention(value, SHAPES, locations, weights)
    )
    out = module(query, references, inputs, _spatial_shapes(SHAPES), _level_start_index(SHAPES))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_module_4d_reference_offsets_in_box_fractions() -> None:
    module = _module(SHAPES)
    query, inputs, points = _module_inputs(module, SHAPES, B, Q, _gen())
    # a box of size (2 P / W_l, 2 P / H_l) turns offsets / P * size / 2 into offsets / (W_l, H_l)
    sizes = torch.tensor([[2.0 * P / wl, 2.0 * P / hl] for hl, wl in SHAPES], dtype=torch.float64)
    boxes = torch.cat([points, sizes.expand(B, Q, -1, -1)], dim=-1)
    args = (inputs, _spatial_shapes(SHAPES), _level_start_index(SHAPES))
    torch.testing.assert_close(module(query, boxes, *args), module(query, points, *args),
                               rtol=0, atol=1e-12)
    # and the box size matters: halving it changes the output
    halved = torch.cat([points, 0.5 * sizes.expand(B, Q, -1, -1)], dim=-1)
    assert not torch.allclose(module(query, halved, *args), module(query, points, *args))


def test_module_rejects_3d_reference() -> None:
    module = _module(SHAPES)
    query, inputs, points = _module_inputs(module, SHAPES, B, Q, _gen())
    with pytest.raises(ValueError, match="got 3"):
        module(query, points[..., [0, 1, 0]], inputs, _spatial_shapes(SHAPES),
               _level_start_index(SHAPES))


def test_module_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_levels=1, n_heads=4, n_points=1)


def test_module_initialisation() -> None:
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=8, n_points=4)
    # the eight directions at 45 degree steps, largest component +-1, point i at i + 1 steps
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
        dtype=torch.float32,
    )
    steps = torch.arange(1, 5, dtype=torch.float32)
    expected = directions[:, None, None, :] * steps[None, None, :, None]
    expected = expected.expand(8, 4, 4, 2)  # (h, L, P, 2), the same for every level
    # float32 cos and sin of 7 pi / 4 differ in their last bits
    torch.testing.assert_close(module.sampling_offsets.bias.view(8, 4, 4, 2), expected,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(module.sampling_offsets.bias.view(8, 4, 4, 2)[2, 0, :, :],
                               torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]),
                               rtol=0, atol=1e-6)
    for zero in (module.sampling_offsets.weight, module.attention_weights.weight,
                 module.attention_weights.bias, module.value_proj.bias, module.output_proj.bias):
        torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=0)
    bound = math.sqrt(6.0 / (32 + 32))  # xavier_uniform
    for linear in (module.value_proj, module.output_proj):
        assert linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.5 * bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_core_cuda_matches_cpu() -> None:
    value, locations, weights = _core_inputs(SHAPES, B, Q, HEADS, D, P, _gen())
    spatial_shapes = _spatial_shapes(SHAPES)
    expected = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
    out = multi_scale_deformable_attention(
        value.cuda(), spatial_shapes.cuda(), locations.cuda(), weights.cuda()
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-12)
