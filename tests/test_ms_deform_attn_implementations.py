"""The implementations of multi-scale deformable attention behind one boundary: the
memory-light function and the Triton kernels (in Triton's interpreter, on CPU tensors) against
the ``grid_sample`` reference, forward and gradients; how the implementation is chosen; float32
locations and weights under autocast; a whole model's training step with each.

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points, S tokens.
"""

import importlib
import os
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.modeling import build_model

import dab_detr.layers as layers
from conftest import config_path
from dab_detr.config import get_dab_detr_cfg
from dab_detr.layers import ms_deform_attn
from dab_detr.layers.ms_deform_attn import (
    MSDeformAttn,
    multi_scale_deformable_attention,
    resolve_implementation,
)

SHAPES = [(5, 7), (3, 4), (2, 2), (1, 3)]  # (H_l, W_l): unequal, non-square
B, Q, HEADS, D, P = 2, 6, 2, 4, 3
TRITON_MODULE = "dab_detr.layers.ms_deform_attn_triton"


def _triton_python_modules() -> List[str]:
    """triton's pure-Python modules (not its compiled ``triton._C``, which cannot be loaded
    twice) and the kernels' module."""
    return [name for name in sys.modules if name == TRITON_MODULE or (
        (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C"))]


@pytest.fixture(scope="module")
def interpreted_triton():
    """The Triton kernels, interpreted on CPU tensors. ``TRITON_INTERPRET=1`` must hold when
    triton's own helpers (``tl.zeros``, ``tl.sum``, ...) are defined, at triton's import,
    which torch or Detectron2 made earlier in the session: triton's Python modules are
    imported afresh with the variable set, then the earlier ones and the environment are
    put back, so that later tests (on a GPU) get compiled kernels."""
    pytest.importorskip("triton")
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_modules = {name: sys.modules.pop(name) for name in _triton_python_modules()}
    os.environ["TRITON_INTERPRET"] = "1"
    ms_deform_attn._triton_import_error.cache_clear()
    try:
        yield importlib.import_module(TRITON_MODULE)
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for name in _triton_python_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        if TRITON_MODULE in saved_modules:
            layers.ms_deform_attn_triton = saved_modules[TRITON_MODULE]
        elif hasattr(layers, "ms_deform_attn_triton"):
            del layers.ms_deform_attn_triton
        ms_deform_attn._triton_import_error.cache_clear()


@pytest.fixture(params=["light", "triton"])
def implementation(request) -> str:
    if request.param == "triton":
        request.getfixturevalue("interpreted_triton")
    return request.param


def _inputs(dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """value ``(B, S, h, d)`` with image 1's right half zero in every level (padding, as
    ``MSDeformAttn`` masks it); locations ``(B, Q, h, L, P, 2)`` in (-0.25, 1.25), so that
    some points fall outside their map or straddle its edge, plus a few placed by hand;
    weights ``(B, Q, h, L, P)`` summing to 1."""
    g = torch.Generator().manual_seed(seed)
    s = sum(hl * wl for hl, wl in SHAPES)
    value = torch.randn(B, s, HEADS, D, generator=g, dtype=dtype)
    padding = torch.cat([torch.arange(wl).repeat(hl) >= (wl + 1) // 2 for hl, wl in SHAPES])
    value[1, padding] = 0
    locations = -0.25 + 1.5 * torch.rand(B, Q, HEADS, len(SHAPES), P, 2, generator=g,
                                         dtype=dtype)
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.6, 1.7])  # wholly outside
    locations[0, 1, 1, 1, 1] = torch.tensor([-0.05, 0.43])  # across the left edge
    locations[1, 2, 0, 3, 2] = torch.tensor([0.97, 1.02])  # across the bottom-right corner
    logits = torch.randn(B, Q, HEADS, len(SHAPES) * P, generator=g, dtype=dtype)
    weights = logits.softmax(-1).view(B, Q, HEADS, len(SHAPES), P)
    return value, locations, weights


def _output_and_grads(implementation: str, inputs: Tuple[torch.Tensor, ...],
                      grad_output: torch.Tensor) -> List[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = multi_scale_deformable_attention(leaves[0], SHAPES, leaves[1], leaves[2],
                                           implementation)
    return [out, *torch.autograd.grad(out, leaves, grad_output)]


def test_forward_and_gradients_equal_the_reference(implementation: str) -> None:
    inputs = _inputs(torch.float32)
    grad_output = torch.randn(B, Q, HEADS * D, generator=torch.Generator().manual_seed(1))
    expected = _output_and_grads("pytorch", inputs, grad_output)
    got = _output_and_grads(implementation, inputs, grad_output)
    for name, e, o in zip(["output", "value", "locations", "weights"], expected, got):
        assert o.dtype == e.dtype, name
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=name)
    # the padding's gradient is not zero: padding is sampled (its value is zero, not absent)
    assert got[1][1, :35].abs().sum() > 0


def test_light_float64_equals_the_reference() -> None:
    inputs = _inputs(torch.float64)
    grad_output = torch.randn(B, Q, HEADS * D, dtype=torch.float64)
    expected = _output_and_grads("pytorch", inputs, grad_output)
    for e, o in zip(expected, _output_and_grads("light", inputs, grad_output)):
        torch.testing.assert_close(o, e, rtol=0, atol=1e-12)


def test_light_gradcheck() -> None:
    shapes = [(2, 3), (1, 2)]
    g = torch.Generator().manual_seed(2)
    value = torch.randn(1, 8, 2, 2, generator=g, dtype=torch.float64)
    # random points, away from the pixel grid where bilinear has kinks; some outside
    locations = -0.2 + 1.4 * torch.rand(1, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(1, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))

    def light(v, loc, w):
        return multi_scale_deformable_attention(v, shapes, loc, w, "light")

    assert torch.autograd.gradcheck(light, inputs, eps=1e-6, atol=1e-7)
