"""Every parameter starts as in the official implementations (docs/initialisation.md lists the
tensors whose initialisation is not PyTorch's default, with the official sources), for
DAB-DETR, DN-DAB-DETR and DAB-Deformable-DETR (one- and two-stage, with denoising).

Each check would fail under PyTorch's default initialisation: exact values for the constants
(zero output biases, the focal prior, the sampling grid), variances for the random draws
(Xavier's ``2 / (fan_in + fan_out)`` against the default's ``1 / (3 fan_in)``; N(0, 1)
embeddings against a Xavier that reached them), equality for the official ``_get_clones``
copies. The draws are seeded (conftest), so the statistics are reproducible; their tolerances
are 5 standard errors of the estimate. The anchors' fixed centres (RANDOM_REFPOINTS_XY) are
not checked here.
"""

import math
from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import config_path, small_cfg
from dab_detr.config import get_dab_detr_cfg

# two encoder and three decoder layers, so that the copies across a stack can be seen
LAYERS = ["MODEL.DAB_DETR.ENC_LAYERS", "2", "MODEL.DAB_DETR.DEC_LAYERS", "3"]
DEFORMABLE = config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml")
DEFORMABLE_SMALL = ["MODEL.WEIGHTS", "", "MODEL.DAB_DETR.HIDDEN_DIM", "64",
                    "MODEL.DAB_DETR.DIM_FEEDFORWARD", "128", "MODEL.DAB_DETR.NHEADS", "4",
                    "MODEL.DAB_DETR.NUM_QUERIES", "10", *LAYERS]
DN = ["MODEL.DAB_DETR.DN.ENABLED", "True"]
TWO_STAGE = ["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True"]
# detrex's two-stage model: enc_output without pos_trans, Xavier as every transformer matrix
ENCODER_CONTENT = [*TWO_STAGE, "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY", "encoder_content"]
# the focal-loss prior: every class starts at probability 0.01
PRIOR = -math.log((1 - 0.01) / 0.01)


def _dab(*opts: str) -> nn.Module:
    return build_model(small_cfg(*LAYERS, *opts))


def _deformable(*opts: str) -> nn.Module:
    return build_model(get_dab_detr_cfg(DEFORMABLE, [*DEFORMABLE_SMALL, *opts]))


FAMILIES = {
    "dab_detr_3_patterns": (_dab, ["MODEL.DAB_DETR.NUM_PATTERNS", "3"]),
    "dn_dab_detr": (_dab, DN),
    "dab_deformable_detr": (_deformable, []),
    "dab_deformable_detr_two_stage": (_deformable, TWO_STAGE),
    "dab_deformable_detr_two_stage_encoder_content": (_deformable, ENCODER_CONTENT),
    "dn_dab_deformable_detr": (_deformable, DN),
}


def official_init(model: nn.Module, name: str, p: torch.Tensor) -> str:
    """The official effective initialisation of parameter ``name`` of ``model``: one of
    ``default`` (PyTorch's, or pretrained: not checked), ``xavier``, ``zeros``, ``prior``,
    ``grid`` (the deformable sampling offsets), ``first_box_bias`` and ``normal`` (N(0, 1))."""
    deformable = hasattr(model, "two_stage")
    if name.startswith("backbone."):
        return "default"
    # DAB-DETR's shared box head is registered under the decoder's name first
    head = name.removeprefix("transformer.decoder.")
    if head.startswith("bbox_embed."):
        if ".layers.2." not in head:  # the last of the MLP's three layers
            return "default"
        if deformable and head == "bbox_embed.0.layers.2.bias" and not model.two_stage:
            return "first_box_bias"
        return "zeros"
    if head.startswith("class_embed"):
        return "prior" if name.endswith(".bias") else "default"
    if name.endswith(("out_proj.bias", "in_proj_bias")):
        return "zeros"
    if any(s in name for s in ("sampling_offsets.weight", "attention_weights.",
                               "value_proj.bias", "output_proj.bias")):
        return "zeros"
    if "sampling_offsets.bias" in name:
        return "grid"
    if name in ("transformer.level_embed", "transformer.patterns.weight",
                "refpoint_embed.weight", "tgt_embed.weight", "patterns_embed.weight",
                "label_enc.weight"):
        return "normal"
    if deformable and name.startswith("input_proj."):
        # conv (Xavier, gain 1, zero bias), then GroupNorm (default)
        if name.endswith(".0.weight"):
            return "xavier"
        return "zeros" if name.endswith(".0.bias") else "default"
    if name.startswith("transformer.") and p.dim() > 1:
        return "xavier"
    return "default"


def _fans(p: torch.Tensor) -> Tuple[int, int]:
    """``(fan_in, fan_out)`` as ``nn.init`` counts them."""
    receptive = p[0][0].numel()  # 1 for a linear layer, k * k for a convolution
    return p.shape[1] * receptive, p.shape[0] * receptive


def assert_xavier_uniform(name: str, p: torch.Tensor) -> None:
    """U(-b, b) with ``b = sqrt(6 / (fan_in + fan_out))``: within the bound, and a variance
    ``b^2 / 3`` within 5 standard errors (the variance of n uniform draws has a relative
    standard error of ``sqrt(0.8 / n)``: 1.4% for a 64 x 64 matrix, 7.9% for the 2 x 64 of
    ``ref_anchor_head``). PyTorch's default, ``U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))``, has
    ``(fan_in + fan_out) / (6 fan_in)`` of that variance: 0.33 for a square matrix, 0.17 to
    0.67 for these tensors, every one outside the tolerance (asserted too)."""
    fan_in, fan_out = _fans(p)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    tol = 5 * math.sqrt(0.8 / p.numel())
    ratio = p.var().item() / (bound**2 / 3)
    default_ratio = (fan_in + fan_out) / (6 * fan_in)
    assert abs(default_ratio - 1) > tol, f"{name}: the check could not tell the default"
    assert p.abs().max() <= bound, name
    assert abs(ratio - 1) < tol, f"{name}: variance {ratio:.3f} of Xavier's, tolerance {tol:.3f}"


def assert_standard_normal(name: str, p: torch.Tensor) -> None:
    """N(0, 1): mean within 5 standard errors (``1 / sqrt(n)``) of 0, variance within 5
    (``sqrt(2 / n)`` relative) of 1. A Xavier over the (P, C) patterns would give them a
    variance ``2 / (P + C)``: 0.03 here; ``torch.empty`` leaves the level embeddings as
    whatever memory held."""
    n = p.numel()
    tol = 5 * math.sqrt(2.0 / n)
    assert abs(p.mean().item()) < 5 / math.sqrt(n), name
    assert abs(p.var().item() - 1) < tol, f"{name}: variance {p.var().item():.3f}, tol {tol:.3f}"


def sampling_grid(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """``(h * L * P * 2,)`` the official ``sampling_offsets.bias``, written out for 4 heads:
    head k points along ``2 pi k / 4`` (right, down, left, up), point i at ``i + 1`` steps."""
    assert n_heads == 4
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    steps = torch.arange(1, n_points + 1, dtype=torch.float32)
    # (h, 1, 1, 2) * (1, 1, P, 1) -> (h, L, P, 2)
    grid = directions[:, None, None, :] * steps[None, None, :, None]
    return grid.expand(n_heads, n_levels, n_points, 2).flatten()


def _by_rule(model: nn.Module) -> Dict[str, List[str]]:
    rules: Dict[str, List[str]] = {}
    for name, p in model.named_parameters():
        rules.setdefault(official_init(model, name, p), []).append(name)
    return rules


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_starts_as_in_the_official_code(family):
    build, opts = FAMILIES[family]
    model = build(*opts)
    params = dict(model.named_parameters())
    rules = _by_rule(model)
    deformable = hasattr(model, "two_stage")
    expected = {"default", "xavier", "zeros", "prior", "normal"}
    if deformable:
        expected |= {"grid"} | (set() if model.two_stage else {"first_box_bias"})
    assert set(rules) == expected  # every rule applies to some tensor: no check is vacuous
    for name in rules["xavier"]:
        assert_xavier_uniform(name, params[name].detach())
    for name in rules["zeros"]:
        torch.testing.assert_close(params[name], torch.zeros_like(params[name]), rtol=0,
                                   atol=0, msg=name)
    for name in rules["prior"]:
        torch.testing.assert_close(params[name], torch.full_like(params[name], PRIOR), msg=name)
    for name in rules.get("first_box_bias", []):
        # the first layer's boxes start smaller than its anchors: sigmoid(logit(wh) - 2)
        torch.testing.assert_close(params[name], torch.tensor([0.0, 0.0, -2.0, -2.0]),
                                   rtol=0, atol=0)
    for name in rules.get("grid", []):
        attn = model.get_submodule(name.removesuffix(".sampling_offsets.bias"))
        # float32 cos(pi / 2) is -4e-8, not 0
        torch.testing.assert_close(
            params[name], sampling_grid(attn.n_heads, attn.n_levels, attn.n_points),
            rtol=0, atol=1e-6, msg=name,
        )
    normal = [params[n].detach().flatten() for n in rules["normal"]]
    for name in rules["normal"]:
        if params[name].numel() >= 128:  # the smaller ones count in the pooled check only
            assert_standard_normal(name, params[name].detach())
    assert_standard_normal("pooled embeddings", torch.cat(normal))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_output_biases_start_at_zero(family):
    """Every attention's output bias, by count: DAB-DETR's decoder attentions once kept
    ``nn.Linear``'s U(-1/8, 1/8) (at width 64) where the official ``MultiheadAttention``
    zeroes them."""
    build, opts = FAMILIES[family]
    model = build(*opts)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("out_proj.bias")}
    # DAB-DETR: the encoder's self-attention and the decoder's two attentions per layer;
    # deformable: the decoder's self-attention only (MSDeformAttn has output_proj)
    assert len(biases) == (3 if hasattr(model, "two_stage") else 2 + 3 * 2)
    for name, bias in biases.items():
        assert (bias == 0).all(), name


def _stacks(model: nn.Module) -> List[nn.ModuleList]:
    return [model.transformer.encoder.layers, model.transformer.decoder.layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_of_a_stack_start_as_copies(family):
    """The official stacks are deep copies of one layer (``_get_clones``) whose matrices the
    transformer's Xavier then redraws: the biases are equal across layers, the matrices are
    not. Independently built layers (PyTorch's default) draw different biases."""
    build, opts = FAMILIES[family]
    model = build(*opts)
    for layers in _stacks(model):
        first = dict(layers[0].named_parameters())
        for layer in layers[1:]:
            for name, p in layer.named_parameters():
                if p.dim() == 1:
                    torch.testing.assert_close(p, first[name], rtol=0, atol=0, msg=name)
                elif p.abs().sum() > 0:  # MSDeformAttn's zero matrices are equal, as zeros
                    assert not torch.equal(p, first[name]), name


@pytest.mark.parametrize("opts", [[], TWO_STAGE, DN], ids=["one_stage", "two_stage", "dn"])
def test_deformable_heads_start_as_copies_of_the_first(opts):
    """Deformable DETR clones its initialised class and box heads for every layer (and the
    two-stage proposals): equal weights, but for the first box head's -2 w/h bias (one-stage),
    set after the copy."""
    model = _deformable(*opts)
    assert len(model.class_embed) == len(model.bbox_embed) == 3 + int(model.two_stage)
    for heads in (model.class_embed, model.bbox_embed):
        first = dict(heads[0].named_parameters())
        for head in heads[1:]:
            for name, p in head.named_parameters():
                if heads is model.bbox_embed and name == "layers.2.bias":
                    assert (p == 0).all()  # the first head's may be -2 (checked above)
                else:
                    torch.testing.assert_close(p, first[name], rtol=0, atol=0, msg=name)


def test_dab_detr_box_heads_per_layer_are_independent():
    """With BBOX_EMBED_DIFF_EACH_LAYER, the official DAB-DETR builds each layer's box head
    afresh (``copy.deepcopy(MLP(...))`` of a new MLP each time): they are not copies."""
    model = _dab("MODEL.DAB_DETR.BBOX_EMBED_DIFF_EACH_LAYER", "True")
    first, second = model.bbox_embed[0].layers[0], model.bbox_embed[1].layers[0]
    assert not torch.equal(first.weight, second.weight)
    assert not torch.equal(first.bias, second.bias)
    for head in model.bbox_embed:
        assert (head.layers[2].weight == 0).all() and (head.layers[2].bias == 0).all()
