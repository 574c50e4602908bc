"""The implementations of multi-scale deformable attention behind one boundary: the
memory-light function and the Triton kernels (in Triton's interpreter, on CPU tensors) against
the ``grid_sample`` reference, forward and gradients; how the implementation is chosen; float32
locations and weights under autocast; a whole model's training step with each.

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points, S tokens.
"""

import importlib
import os
import re
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

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


@pytest.fixture(params=["pytorch", "light", "triton"])
def any_implementation(request) -> str:
    if request.param == "triton":
        request.getfixturevalue("interpreted_triton")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_value_float32_locations(any_implementation: str,
                                                dtype: torch.dtype) -> None:
    """A half-precision value is sampled with float32 locations and weights, in float32: the
    result is the float32 result (of the same value numbers) rounded once; the gradients of
    locations and weights are float32 and equal the float32 ones."""
    value, locations, weights = _inputs(torch.float32)
    value = value.to(dtype)
    # the gradient that reaches the attention is rounded to the output's dtype
    grad_output = torch.randn(B, Q, HEADS * D).to(dtype)
    expected = _output_and_grads("pytorch", (value.float(), locations, weights),
                                 grad_output.float())
    got = _output_and_grads(any_implementation, (value, locations, weights), grad_output)
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32, torch.float32]
    torch.testing.assert_close(got[0], expected[0].to(dtype), msg="output")
    torch.testing.assert_close(got[1], expected[1].to(dtype), msg="value")
    for name, e, o in zip(["locations", "weights"], expected[2:], got[2:]):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=name)


def test_auto_is_light_on_cpu_and_exports_take_the_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    value = torch.zeros(1, 2, 1, 1)
    assert resolve_implementation("auto", value) == "light"
    assert resolve_implementation("pytorch", value) == "pytorch"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert [resolve_implementation(name, value) for name in ("auto", "light", "triton")] == [
        "pytorch"] * 3


def test_unknown_implementation_is_refused_by_name() -> None:
    value, locations, weights = _inputs(torch.float32)
    named = r"MODEL.DAB_DETR.DEFORMABLE_ATTENTION='cuda': expected one of \['auto', 'pytorch', "
    with pytest.raises(ValueError, match=named):
        multi_scale_deformable_attention(value, SHAPES, locations, weights, "cuda")
    with pytest.raises(ValueError, match=named):
        MSDeformAttn(8, 2, 2, 2, implementation="cuda")
    with pytest.raises(ValueError, match=named):
        build_model(_deformable_cfg("cuda"))


def test_triton_where_it_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    value, locations, weights = _inputs(torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ms_deform_attn, "_triton_import_error", lambda: None)
    with pytest.raises(ValueError, match="DEFORMABLE_ATTENTION='triton' needs CUDA tensors, "
                                         "got a cpu value"):
        multi_scale_deformable_attention(value, SHAPES, locations, weights, "triton")


def test_without_triton_auto_is_light_and_triton_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``import triton`` failing (as where it is not installed): the package runs, "auto"
    needs no triton, "triton" is refused naming the key and the import error."""
    value, locations, weights = _inputs(torch.float32)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes ``import triton`` fail
    monkeypatch.delitem(sys.modules, TRITON_MODULE, raising=False)
    monkeypatch.delattr(layers, "ms_deform_attn_triton", raising=False)
    ms_deform_attn._triton_import_error.cache_clear()
    try:
        out = multi_scale_deformable_attention(value, SHAPES, locations, weights, "auto")
        expected = multi_scale_deformable_attention(value, SHAPES, locations, weights)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="DEFORMABLE_ATTENTION='triton' needs the triton "
                                             "package .* failed to import: .*triton"):
            multi_scale_deformable_attention(value, SHAPES, locations, weights, "triton")
    finally:
        monkeypatch.undo()
        ms_deform_attn._triton_import_error.cache_clear()


def test_module_under_bf16_autocast_samples_at_float32_locations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast the value is bfloat16, but the locations and the attention weights
    reach the sampling in float32, equal to those computed without autocast."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    module = MSDeformAttn(16, len(SHAPES), HEADS, P)
    with torch.no_grad():
        for linear in (module.sampling_offsets, module.attention_weights):
            linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=g))
    s = sum(hl * wl for hl, wl in SHAPES)
    query, inputs = torch.randn(B, Q, 16, generator=g), torch.randn(B, s, 16, generator=g)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(B, Q, len(SHAPES), 2, generator=g),
                       0.1 + 0.3 * torch.rand(B, Q, len(SHAPES), 2, generator=g)], -1)
    locations, weights = module.sampling_locations_and_weights(query, boxes, SHAPES)
    args = (boxes, inputs, SHAPES, torch.zeros(len(SHAPES), dtype=torch.long))
    expected = module(query, *args)
    seen = {}
    boundary = ms_deform_attn.multi_scale_deformable_attention

    def recording(value, shapes, locations, weights, implementation):
        seen.update(value=value, locations=locations, weights=weights)
        return boundary(value, shapes, locations, weights, implementation)

    monkeypatch.setattr(ms_deform_attn, "multi_scale_deformable_attention", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, *args)
    assert (seen["value"].dtype, seen["locations"].dtype, seen["weights"].dtype) == (
        torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(seen["locations"], locations, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["weights"], weights, rtol=0, atol=1e-6)
    # bfloat16 projections: close to float32, not equal
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05)
    out.float().sum().backward()
    assert module.sampling_offsets.weight.grad.dtype == torch.float32


def _deformable_cfg(implementation: str):
    """A small DN-DAB-Deformable-DETR (4 levels, 4 points), on CPU."""
    return get_dab_detr_cfg(config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml"), [
        "MODEL.WEIGHTS", "", "MODEL.DAB_DETR.HIDDEN_DIM", "32",
        "MODEL.DAB_DETR.DIM_FEEDFORWARD", "64", "MODEL.DAB_DETR.NHEADS", "2",
        "MODEL.DAB_DETR.ENC_LAYERS", "1", "MODEL.DAB_DETR.DEC_LAYERS", "2",
        "MODEL.DAB_DETR.NUM_QUERIES", "8", "MODEL.DAB_DETR.DN.ENABLED", "True",
        "MODEL.DAB_DETR.DEFORMABLE_ATTENTION", implementation])


def _training_step(implementation: str, state: Dict[str, torch.Tensor]):
    """Losses and parameter gradients of one training step on two images of unequal sizes
    (so that the smaller is padded), the same weights and the same denoising noise."""
    model = build_model(_deformable_cfg(implementation)).train()
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), boxes in [((96, 128), [[4.0, 6.0, 60.0, 50.0], [70, 20, 120, 90]]),
                          ((64, 96), [[10.0, 10.0, 50.0, 40.0]])]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.arange(len(boxes))
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    torch.manual_seed(1)
    losses = model(batch)
    sum(losses.values()).backward()
    return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_model_training_step_is_the_same_with_each_implementation(
        implementation: str) -> None:
    torch.manual_seed(0)
    state = build_model(_deformable_cfg("pytorch")).state_dict()
    # Initialised, the encoder's points lie on pixel centres (whole-pixel offsets from token
    # centres), where bilinear sampling has a kink: its derivative there is one-sided, and
    # which side an implementation takes depends on how it rounds the pixel coordinate (the
    # light backward is grid_sample's own; the kernels compute ``x W - 0.5`` as the official
    # CUDA op does, grid_sample ``((2 x - 1 + 1) W - 1) / 2``).
    # Offsets moved by a fraction of a pixel keep every point off the grid.
    for name, tensor in state.items():
        if name.endswith("sampling_offsets.bias"):
            tensor += 0.3 * torch.rand(tensor.shape, generator=torch.Generator().manual_seed(5))
    expected_losses, expected_grads = _training_step("pytorch", state)
    losses, grads = _training_step(implementation, state)
    assert losses.keys() == expected_losses.keys()
    for name, value in losses.items():
        torch.testing.assert_close(value, expected_losses[name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == expected_grads.keys()
    # float32 round-off (1e-6 at most, measured, against gradients up to about 1) through
    # the backbone, whose convolutions sum the attention's gradients in another order
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_benchmark_prints_each_implementation_at_each_scale(
        capsys: pytest.CaptureFixture) -> None:
    """``benchmarks/deformable_attention.py`` on a tiny image: a row per scale, pass and CPU
    implementation, with a time and a peak memory (numbers, not their values, are checked);
    the reference's ratios are 1."""
    from benchmarks import deformable_attention

    deformable_attention.main(["--image", "64", "96", "--repeats", "1", "--warmup", "0",
                               "--threads", "1"])
    stdout = capsys.readouterr().out
    table = stdout[stdout.index("| case |"):].splitlines()[2:]
    row = re.compile(r"\| (encoder|decoder), float32, (forward|forward \+ backward) \| "
                     r"(pytorch|light) \| (\d+\.\d) ms \(\d+\.\d-\d+\.\d\) \| (\d+) MiB \| "
                     r"(\d+\.\d\d) \| (\d+\.\d\d) \|$")
    parsed = [row.match(line) for line in table]
    assert all(parsed), table
    assert [m.group(1, 2, 3) for m in parsed] == [
        (scale, mode, name) for scale in ("encoder", "decoder")
        for mode in ("forward", "forward + backward") for name in ("pytorch", "light")]
    for m in parsed:
        assert float(m.group(4)) > 0
        if m.group(3) == "pytorch":
            assert m.group(6, 7) == ("1.00", "1.00")
