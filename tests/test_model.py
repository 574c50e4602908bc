"""DAB-DETR's model-level behaviour: width/height-modulated attention, layer-by-layer anchor
refinement, fixed anchor centres (fixxy), padding invariance, the parameter count and anchor
points (QUERY_DIM 2)."""

from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from conftest import load_cfg
from dab_detr.engine.optimizer import build_optimizer
from dab_detr.layers.box_ops import inverse_sigmoid
from dab_detr.layers.position_encoding import box_sine_embedding
from dab_detr.modeling.transformer.decoder import TransformerDecoder

SHAPES = "quick_schedules/dab_detr_R_18_shapes.yaml"
DEFORMABLE_SHAPES = "quick_schedules/dab_deformable_detr_R_18_shapes.yaml"
R50 = "COCO-Detection/dab_detr_R_50_50ep.yaml"
FIXXY = "COCO-Detection/dab_detr_R_50_DC5_fixxy_50ep.yaml"
C = 32  # d_model of the stand-alone decoders


def _batch(sizes: List[Tuple[int, int]], num_boxes: List[int], num_classes: int) -> List[Dict]:
    """Random images with ``num_boxes[i]`` random boxes (XYXY pixels) each."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), n in zip(sizes, num_boxes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = (torch.rand(n, 2, generator=g) * 0.4 + 0.1) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return batch


def _randomize_box_head(model: nn.Module) -> None:
    """The box head's last layer starts at zero, which makes every box its anchor whatever
    the image: give it weights so that boxes depend on the features."""
    g = torch.Generator().manual_seed(2)
    last = model.bbox_embed.layers[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.1)


def _decoder(modulate_hw_attn: bool = True, bbox_embed=None, num_layers: int = 2):
    return TransformerDecoder(
        d_model=C, nhead=4, num_layers=num_layers, dim_feedforward=64, dropout=0.0,
        activation=nn.PReLU, modulate_hw_attn=modulate_hw_attn, bbox_embed=bbox_embed,
    ).eval()


class ConstantRefHead(nn.Module):
    """Stands in for ``ref_anchor_head``: (w_ref, h_ref) after the sigmoid, for every query."""

    def __init__(self, w_ref: float, h_ref: float):
        super().__init__()
        self.register_buffer("logits", torch.logit(torch.tensor([w_ref, h_ref])))

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*tgt.shape[:-1], 2)


def _anchors_and_content(b: int = 2, nq: int = 5):
    anchors = torch.rand(b, nq, 4) * 0.5 + 0.25
    return anchors, torch.randn(b, nq, C)


@torch.no_grad()
def test_spatial_query_modulation_by_reference_size():
    decoder = _decoder()
    anchors, tgt = _anchors_and_content()
    sine = box_sine_embedding(anchors, C // 2)
    for layer_id in (0, 1):
        decoder.ref_anchor_head = ConstantRefHead(0.2, 0.3)
        base = decoder.spatial_query(sine, tgt, anchors, layer_id)
        # channels [0, C/2) encode y (scaled by h_ref / h), [C/2, C) encode x (w_ref / w)
        content_scale = decoder.query_scale(tgt) if layer_id > 0 else 1.0
        modulation = torch.cat([(0.3 / anchors[..., 3:4]).expand(-1, -1, C // 2),
                                (0.2 / anchors[..., 2:3]).expand(-1, -1, C // 2)], -1)
        torch.testing.assert_close(base, sine[..., :C] * content_scale * modulation)

        decoder.ref_anchor_head = ConstantRefHead(0.4, 0.3)  # w_ref doubled
        wide = decoder.spatial_query(sine, tgt, anchors, layer_id)
        torch.testing.assert_close(wide[..., C // 2 :], 2 * base[..., C // 2 :])
        torch.testing.assert_close(wide[..., : C // 2], base[..., : C // 2])

        decoder.ref_anchor_head = ConstantRefHead(0.2, 0.6)  # h_ref doubled
        tall = decoder.spatial_query(sine, tgt, anchors, layer_id)
        torch.testing.assert_close(tall[..., : C // 2], 2 * base[..., : C // 2])
        torch.testing.assert_close(tall[..., C // 2 :], base[..., C // 2 :])


@torch.no_grad()
def test_spatial_query_modulation_by_anchor_size():
    """With the learned ``ref_anchor_head``: halving the anchors' w doubles the x part,
    halving h doubles the y part."""
    decoder = _decoder()
    anchors, tgt = _anchors_and_content()
    for layer_id in (0, 1):
        base = decoder.spatial_query(box_sine_embedding(anchors, C // 2), tgt, anchors, layer_id)
        for dim, changed in ((2, slice(C // 2, C)), (3, slice(0, C // 2))):
            half = anchors.clone()
            half[..., dim] /= 2
            out = decoder.spatial_query(box_sine_embedding(half, C // 2), tgt, half, layer_id)
            other = slice(0, C // 2) if dim == 2 else slice(C // 2, C)
            torch.testing.assert_close(out[..., changed], 2 * base[..., changed])
            torch.testing.assert_close(out[..., other], base[..., other])


@torch.no_grad()
def test_spatial_query_without_modulation_ignores_size():
    decoder = _decoder(modulate_hw_attn=False)
    assert decoder.ref_anchor_head is None
    anchors, tgt = _anchors_and_content()
    resized = anchors.clone()
    resized[..., 2:] = torch.rand(2, 5, 2) * 0.5 + 0.1
    for layer_id in (0, 1):
        sine = box_sine_embedding(anchors, C // 2)
        out = decoder.spatial_query(sine, tgt, anchors, layer_id)
        content_scale = decoder.query_scale(tgt) if layer_id > 0 else 1.0
        torch.testing.assert_close(out, sine[..., :C] * content_scale)
        out_resized = decoder.spatial_query(
            box_sine_embedding(resized, C // 2), tgt, resized, layer_id
        )
        torch.testing.assert_close(out_resized, out, rtol=0, atol=0)


class DeltaHead(nn.Module):
    """A box head whose output is a learned constant ``(NQ, 4)`` delta."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(delta)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.delta.expand(tgt.shape[0], -1, -1)


def _run_decoder(decoder: TransformerDecoder, refpoints: torch.Tensor):
    """Decoder outputs and the anchors each layer received."""
    b, nq, _ = refpoints.shape
    seen = []
    spatial_query = decoder.spatial_query

    def spy(sine_embed, tgt, anchors, layer_id):
        seen.append(anchors)
        return spatial_query(sine_embed, tgt, anchors, layer_id)

    decoder.spatial_query = spy
    hs, references = decoder(torch.zeros(b, nq, C), torch.randn(b, 6, C), torch.randn(b, 6, C),
                             refpoints, None)
    return hs, references, seen


def test_anchor_refinement():
    head = DeltaHead(torch.randn(5, 4) * 0.5)
    decoder = _decoder(bbox_embed=head, num_layers=3)
    refpoints = torch.randn(2, 5, 4, requires_grad=True)
    hs, references, seen = _run_decoder(decoder, refpoints)
    assert hs.shape == (3, 2, 5, C)
    assert references.shape == (3, 2, 5, 4)
    expected = [refpoints.detach().sigmoid()]
    for _ in range(2):
        expected.append((head.delta.detach() + inverse_sigmoid(expected[-1])).sigmoid())
    torch.testing.assert_close(references, torch.stack(expected))
    # every layer got the anchors of its reference; after the first, detached
    assert len(seen) == 3
    torch.testing.assert_close(torch.stack(seen), references)
    assert seen[0].requires_grad and not seen[1].requires_grad and not seen[2].requires_grad
    assert references[1].requires_grad and references[2].requires_grad
    # gradients of the last reference reach the head through the last update only
    references[2].sum().backward()
    s = references[2].detach()
    torch.testing.assert_close(head.delta.grad, (s * (1 - s)).sum(0))
    # (the stack of references links refpoints to the graph, with zero gradient)
    torch.testing.assert_close(refpoints.grad, torch.zeros(2, 5, 4), rtol=0, atol=0)


def test_fixed_anchors_without_iter_update():
    decoder = _decoder(bbox_embed=None, num_layers=3)
    refpoints = torch.randn(2, 5, 4)
    with torch.no_grad():
        hs, references, seen = _run_decoder(decoder, refpoints)
    assert hs.shape == (3, 2, 5, C)
    assert references.shape == (1, 2, 5, 4)
    torch.testing.assert_close(references, refpoints.sigmoid()[None])
    for anchors in seen:
        torch.testing.assert_close(anchors, refpoints.sigmoid())


@pytest.mark.parametrize("iter_update", [True, False])
def test_model_reference_shapes(iter_update):
    cfg = load_cfg(SHAPES, "MODEL.DAB_DETR.ITER_UPDATE", str(iter_update))
    model = build_model(cfg).eval()
    captured = {}
    model.transformer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    batch = _batch([(64, 80), (72, 64)], [1, 1], 5)
    with torch.no_grad():
        outputs = model.forward_predictions(model.preprocess_image(batch))
    hs, references = captured["out"]
    d = cfg.MODEL.DAB_DETR
    assert hs.shape == (d.DEC_LAYERS, 2, d.NUM_QUERIES, d.HIDDEN_DIM)
    assert references.shape == ((d.DEC_LAYERS if iter_update else 1), 2, d.NUM_QUERIES, 4)
    assert outputs["pred_boxes"].shape == (2, d.NUM_QUERIES, 4)
    assert outputs["pred_logits"].shape == (2, d.NUM_QUERIES, d.NUM_CLASSES)
    assert len(outputs["aux_outputs"]) == d.DEC_LAYERS - 1


def test_fixxy_keeps_anchor_centres():
    cfg = load_cfg(FIXXY, "MODEL.DAB_DETR.NUM_QUERIES", "20")
    assert cfg.SOLVER.WEIGHT_DECAY > 0
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    centres = model.anchors()[:, :2].detach().clone()
    sizes = model.refpoint_embed.weight.detach().clone()
    assert sizes.shape == (20, 2)
    # centres drawn uniformly, not a constant
    assert centres.sigmoid().std() > 0.1
    batch = _batch([(64, 80), (72, 64)], [2, 1], 80)
    for _ in range(3):
        optimizer.zero_grad()
        sum(model(batch).values()).backward()
        optimizer.step()
    torch.testing.assert_close(model.anchors()[:, :2], centres, rtol=0, atol=0)
    assert (model.refpoint_embed.weight.detach() - sizes).abs().amin() > 0


@torch.no_grad()
def test_padded_features_do_not_change_outputs():
    """Noise added to the backbone features at the (downsampled) padded positions of the
    smaller image changes no prediction of either image, in any layer."""
    model = build_model(load_cfg(SHAPES)).eval()
    _randomize_box_head(model)
    batch = _batch([(64, 80), (96, 128)], [1, 1], 5)
    images = model.preprocess_image(batch)
    clean = model.forward_predictions(images)
    g = torch.Generator().manual_seed(1)
    noise_at = {}  # "where": (B, h, w) bool, the feature positions that get noise

    def add_noise(module, inputs, out):
        feat = out[model.in_feature]
        noise = torch.randn(feat.shape, generator=g) * 10 * noise_at["where"][:, None]
        return {**out, model.in_feature: feat + noise}

    with torch.no_grad():
        res5 = model.backbone(images.tensor)[model.in_feature]
    # the mask as forward_predictions downsamples it
    padded = F.interpolate(model.padding_mask(images)[None].float(), size=res5.shape[-2:])
    padded = padded[0].bool()
    assert padded[0].any() and not padded[1].any()
    handle = model.backbone.register_forward_hook(add_noise)
    noise_at["where"] = padded
    noisy = model.forward_predictions(images)
    # the hook is live: noise everywhere in image 0 does change its outputs
    noise_at["where"] = torch.zeros_like(padded)
    noise_at["where"][0] = True
    changed = model.forward_predictions(images)
    handle.remove()

    for ref, out in zip([clean] + clean["aux_outputs"], [noisy] + noisy["aux_outputs"]):
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=0, atol=1e-5)
    for key in ("pred_logits", "pred_boxes"):
        assert (changed[key][0] - clean[key][0]).abs().amax() > 1e-3


@torch.no_grad()
def test_batched_vs_single_image_measurement():
    """The backbone sees the padding, so batching changes the features near the border:
    this measures the effect (printed) and checks only finiteness and shapes."""
    model = build_model(load_cfg(R50)).eval()
    _randomize_box_head(model)
    batch = _batch([(64, 80), (96, 128)], [1, 1], 80)
    single = model.forward_predictions(model.preprocess_image(batch[:1]))
    batched = model.forward_predictions(model.preprocess_image(batch))
    for key in ("pred_logits", "pred_boxes"):
        assert single[key].shape[1:] == batched[key].shape[1:]
        assert torch.isfinite(single[key]).all() and torch.isfinite(batched[key]).all()
    score_diff = (single["pred_logits"][0].sigmoid() - batched["pred_logits"][0].sigmoid()).abs()
    box_diff = (single["pred_boxes"][0] - batched["pred_boxes"][0]).abs()
    print(f"batched vs single (R50, random weights, 64x80 padded to 96x128): "
          f"max |score diff| {score_diff.max():.3g}, max |box diff| {box_diff.max():.3g}, "
          f"mean |box diff| {box_diff.mean():.3g}")


def test_r50_parameter_count():
    model = build_model(load_cfg(R50))
    # the released model has 91 class rows; this one has the 80 used ones
    assert sum(p.numel() for p in model.parameters()) == 43_671_517 - 11 * 256 - 11


def test_anchor_points():
    cfg = load_cfg(SHAPES, "MODEL.DAB_DETR.QUERY_DIM", "2",
                   "MODEL.DAB_DETR.MODULATE_HW_ATTN", "False")
    model = build_model(cfg).train()
    assert model.anchors().shape == (cfg.MODEL.DAB_DETR.NUM_QUERIES, 2)
    optimizer = build_optimizer(cfg, model)
    batch = _batch([(64, 80), (72, 64)], [2, 0], 5)
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    before = model.refpoint_embed.weight.detach().clone()
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(model.refpoint_embed.weight.detach(), before)
    model.eval()
    with torch.no_grad():
        results = model(batch)
    for inp, res in zip(batch, results):
        inst = res["instances"]
        assert inst.image_size == tuple(inp["image"].shape[1:])
        assert len(inst) > 0 and torch.isfinite(inst.pred_boxes.tensor).all()


def test_anchor_points_with_modulation_raise():
    cfg = load_cfg(SHAPES, "MODEL.DAB_DETR.QUERY_DIM", "2")
    with pytest.raises(ValueError, match="modulate_hw_attn"):
        build_model(cfg)


def test_no_encoder_layers_trains_every_parameter_and_detects():
    """ENC_LAYERS 0: the decoder attends to the projected backbone map itself, and no
    parameter is left without a gradient (DDP would stop at the second iteration)."""
    torch.manual_seed(0)
    model = build_model(load_cfg(SHAPES, "MODEL.DAB_DETR.ENC_LAYERS", "0"))
    assert len(model.transformer.encoder.layers) == 0
    batch = _batch([(64, 80), (72, 64)], [2, 3], num_classes=5)
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    model.eval()
    with torch.no_grad():
        results = model(batch)
    assert [len(r["instances"]) for r in results] == [model.num_select] * 2


def test_deformable_model_without_encoder_layers_is_refused():
    with pytest.raises(ValueError, match="MODEL.DAB_DETR.ENC_LAYERS=0"):
        build_model(load_cfg(DEFORMABLE_SHAPES, "MODEL.DAB_DETR.ENC_LAYERS", "0"))


@pytest.mark.parametrize("key,value", [("ENC_LAYERS", "-1"), ("DEC_LAYERS", "0")])
def test_impossible_layer_counts_are_refused(key, value):
    for config in (SHAPES, DEFORMABLE_SHAPES):
        with pytest.raises(ValueError, match=f"MODEL.DAB_DETR.{key}={value}"):
            build_model(load_cfg(config, f"MODEL.DAB_DETR.{key}", value))
