"""DAB-Deformable-DETR's own pieces: valid ratios and encoder reference points, the two-stage
proposals, the decoder's anchors, the model's options and the settings it refuses. (Its
equivalence with the official model is in test_equivalence_official.py; every config trains a
step and infers in test_configs.py.)"""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import config_path
from dab_detr.checkpoint import convert_official
from dab_detr.config import get_dab_detr_cfg
from dab_detr.modeling.deformable_transformer import (
    encoder_output_proposals,
    encoder_reference_points,
    valid_ratios,
)

SHAPES = config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml")
SMALL = ["MODEL.DAB_DETR.HIDDEN_DIM", "64", "MODEL.DAB_DETR.DIM_FEEDFORWARD", "128",
         "MODEL.DAB_DETR.NHEADS", "4", "MODEL.DAB_DETR.ENC_LAYERS", "1",
         "MODEL.DAB_DETR.DEC_LAYERS", "2", "MODEL.DAB_DETR.NUM_QUERIES", "10"]


def _cfg(*opts: str):
    return get_dab_detr_cfg(SHAPES, ["MODEL.WEIGHTS", "", *SMALL, *opts])


def _batch():
    """A 96 x 128 image with two boxes and a smaller 64 x 96 one with one box."""
    g = torch.Generator().manual_seed(0)
    items = []
    for (h, w), boxes, classes in [((96, 128), [[4.0, 6.0, 60.0, 50.0], [70, 20, 120, 90]],
                                    [0, 4]), ((64, 96), [[10.0, 10.0, 50.0, 40.0]], [2])]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        items.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return items


def test_valid_ratios_of_a_padded_mask():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :, :] = False  # no padding
    mask[1, :3, :2] = False  # a 3 x 2 image in a 4 x 5 map
    torch.testing.assert_close(valid_ratios(mask), torch.tensor([[1.0, 1.0], [0.4, 0.75]]))
    assert valid_ratios(mask).dtype == torch.float32


def test_encoder_reference_points_are_token_centres_in_each_level():
    """Token (i, j) of a level, for an image that fills a fraction r of it, is at
    ((j + 0.5) / (r_w W), (i + 0.5) / (r_h H)) of the image, i.e. that times r_l in the padded
    coordinates of level l."""
    shapes = torch.tensor([[2, 4], [1, 2]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 1.0], [0.5, 1.0]]])
    points = encoder_reference_points(shapes, ratios)  # (B, S, L, 2)
    assert points.shape == (2, 8 + 2, 2, 2)
    # image 0 fills every level: level-0 token (1, 3) is at ((3.5) / 4, 1.5 / 2) everywhere
    torch.testing.assert_close(points[0, 7], torch.tensor([[3.5 / 4, 1.5 / 2]] * 2))
    # image 1 fills half the width: x is normalised by the valid width, then scaled back
    x_in_image = 0.5 / (0.5 * 4)
    torch.testing.assert_close(points[1, 0, :, 0], torch.tensor([x_in_image * 0.5] * 2))
    # a level-1 token (0, 1): x = 1.5 / (0.5 * 2) = 1.5 of the image (outside, in padding)
    torch.testing.assert_close(points[1, 9, :, 0], torch.tensor([1.5 * 0.5] * 2))


def test_encoder_proposals_centres_sizes_and_exclusions():
    b, c = 2, 8
    shapes = torch.tensor([[4, 4], [2, 2]])
    mask = torch.zeros(b, 20, dtype=torch.bool)
    level0 = mask[:, :16].view(b, 4, 4)
    level0[1, :, 2:] = True  # image 1 fills the left half of level 0
    memory = torch.randn(b, 20, c)
    out, proposals = encoder_output_proposals(memory, mask, shapes)
    boxes = proposals.sigmoid()
    # level 0, image 0, token (1, 2): centre ((2 + 0.5) / 4, (1 + 0.5) / 4), side 0.05
    torch.testing.assert_close(boxes[0, 4 + 2], torch.tensor([2.5 / 4, 1.5 / 4, 0.05, 0.05]))
    # level 1, token (0, 0): side 0.05 * 2
    torch.testing.assert_close(boxes[0, 16], torch.tensor([0.25, 0.25, 0.1, 0.1]))
    # image 1, level 0: x normalised by its valid width of 2 tokens
    torch.testing.assert_close(boxes[1, 1, 0], torch.tensor(1.5 / 2))
    # padding is never a proposal, and its memory is zeroed
    padded = mask | ~((boxes > 0.01) & (boxes < 0.99)).all(-1)
    assert torch.isinf(proposals[1, 2]).all() and padded[1, 2]
    assert torch.isinf(proposals[padded]).all()
    assert (out[padded] == 0).all() and torch.equal(out[~padded], memory[~padded])


@pytest.mark.parametrize("query", ["official", "encoder_content"])
def test_two_stage_anchors_are_the_top_encoder_proposals(query):
    """Two-stage: the decoder's first anchors are the refined boxes of the encoder proposals
    that score highest (official: by the first class; encoder_content, detrex's: by the best
    class, and the content queries are those tokens' projected memory), and training gives
    every parameter a gradient."""
    model = build_model(_cfg("MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True",
                             "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY", query))
    proposals = model.transformer.proposals
    assert hasattr(proposals, "pos_trans") == (query == "official")
    seen = {}
    model.transformer.decoder.register_forward_hook(
        lambda module, args, output: seen.update(references=output[2])
    )
    model.transformer.decoder.register_forward_pre_hook(
        lambda module, args: seen.update(tgt=args[0])
    )
    proposals.enc_output_norm.register_forward_hook(
        lambda module, args, output: seen.update(projected=output)
    )
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(_batch())
        outputs = model.forward_predictions(images, with_aux=True)
    enc = outputs["enc_outputs"]
    # padding and border proposals rank last: their boxes are sigmoid(inf) = 1 (a valid one,
    # a logit of [0.01, 0.99] plus the zero delta of an untrained head, is below 1)
    invalid = (enc["pred_boxes"] == 1).any(-1)
    assert invalid[1].any()  # the smaller image is padded: the exclusion is exercised
    logits = enc["pred_logits"]  # (B, S, K)
    score = logits[..., 0] if query == "official" else logits.max(-1).values
    top = score.masked_fill(invalid, float("-inf")).topk(10, dim=1).indices  # (B, 10)
    if query == "encoder_content":
        # the untrained heads rank differently by the first class: the switch is exercised
        assert not torch.equal(top, logits[..., 0].masked_fill(invalid, float("-inf"))
                               .topk(10, dim=1).indices)
        expected_tgt = torch.gather(seen["projected"], 1, top[..., None].expand(-1, -1, 64))
        torch.testing.assert_close(seen["tgt"], expected_tgt, rtol=0, atol=0)
    expected = torch.gather(enc["pred_boxes"], 1, top[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(seen["references"][0], expected)

    model.train()
    losses = model(_batch())
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_batched_inference_gives_each_image_its_own_size():
    """Two-stage, two sizes in a batch: each image gets detections at its own size, and the
    image that fills the batch (no padding) gets the same as alone: the padding of the other
    never becomes one of its anchors."""
    model = build_model(_cfg("MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True")).eval()
    batch = _batch()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        raw = model.forward_predictions(images, with_aux=False)
        results = model(batch)
        alone = model.forward_predictions(model.preprocess_image(batch[:1]), with_aux=False)
    assert ((raw["pred_boxes"] >= 0) & (raw["pred_boxes"] <= 1)).all()
    torch.testing.assert_close(raw["pred_boxes"][:1], alone["pred_boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(raw["pred_logits"][:1], alone["pred_logits"], rtol=0, atol=1e-4)
    for inp, res in zip(batch, results):
        inst = res["instances"]
        assert inst.image_size == tuple(inp["image"].shape[1:])
        assert len(inst) == 10 * 5  # NUM_SELECT (100) is more than queries x classes


@pytest.mark.parametrize("opts", [["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True"],
                                  ["MODEL.DAB_DETR.DN.ENABLED", "True"]],
                         ids=["two_stage", "dn"])
def test_training_step_under_autocast(opts):
    """bfloat16 autocast (CPU here; SOLVER.AMP.ENABLED on CUDA): the network runs in half
    precision, the losses are float32 and finite, and backward gives every parameter a
    gradient."""
    model = build_model(_cfg(*opts)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_decoder_refines_anchors_layer_by_layer():
    """Each layer's boxes are its input anchors refined by its own head, and the next layer's
    anchors are those boxes, detached."""
    model = build_model(_cfg()).eval()
    seen = {}
    model.transformer.decoder.register_forward_hook(
        lambda module, args, output: seen.update(hs=output[0], boxes=output[1], refs=output[2])
    )
    with torch.no_grad():
        outputs = model.forward_predictions(model.preprocess_image(_batch()), with_aux=True)
    refs, boxes, hs = seen["refs"], seen["boxes"], seen["hs"]
    torch.testing.assert_close(refs[0], model.anchors().sigmoid().expand(2, -1, -1))
    torch.testing.assert_close(refs[1], boxes[0])
    for layer in range(2):
        delta = model.bbox_embed[layer](hs[layer])
        expected = (delta + torch.logit(refs[layer].clamp(1e-3, 1 - 1e-3))).sigmoid()
        torch.testing.assert_close(boxes[layer], expected)
    torch.testing.assert_close(outputs["pred_boxes"], boxes[-1])
    torch.testing.assert_close(outputs["pred_logits"], model.class_embed[1](hs[1]))


def test_first_box_head_starts_with_smaller_boxes():
    """As the official model: zero deltas but for the first layer's w and h bias, -2."""
    model = build_model(_cfg())
    first, second = model.bbox_embed[0].layers[-1], model.bbox_embed[1].layers[-1]
    torch.testing.assert_close(first.bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert (first.weight == 0).all() and (second.weight == 0).all() and (second.bias == 0).all()
    # the decoder refines with the detector's heads: one module under two names
    assert model.transformer.decoder.bbox_embed is model.bbox_embed


def test_patterns_and_fixed_centres():
    model = build_model(_cfg("MODEL.DAB_DETR.NUM_PATTERNS", "3",
                             "MODEL.DAB_DETR.RANDOM_REFPOINTS_XY", "True"))
    tgt, anchors = model.queries(2)
    assert tgt.shape == (2, 30, 64) and anchors.shape == (2, 30, 4)
    # query p * Q + q: pattern p plus content q, anchor q
    torch.testing.assert_close(tgt[0, 2 * 10 + 4],
                               model.patterns_embed.weight[2] + model.tgt_embed.weight[4])
    torch.testing.assert_close(anchors[0, 2 * 10 + 4], anchors[0, 4])
    assert "refpoint_xy" in dict(model.named_buffers())
    assert model.refpoint_embed.weight.shape == (10, 2)
    losses = model.train()(_batch())
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("opts, named", [
    (["MODEL.DAB_DETR.AUX_LOSS", "False"], "MODEL.DAB_DETR.AUX_LOSS"),
    (["MODEL.DAB_DETR.QUERY_DIM", "2", "MODEL.DAB_DETR.MODULATE_HW_ATTN", "False"],
     "MODEL.DAB_DETR.QUERY_DIM"),
    (["MODEL.DAB_DETR.HIDDEN_DIM", "48"], "MODEL.DAB_DETR.HIDDEN_DIM"),
    (["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True", "MODEL.DAB_DETR.NUM_PATTERNS", "2"],
     "NUM_PATTERNS"),
    (["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"],
     "MODEL.RESNETS.OUT_FEATURES"),
    (["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "True",
      "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY", "dino"],
     "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY"),
])
def test_unsupported_settings_are_refused_by_name(opts, named):
    with pytest.raises(ValueError, match=named):
        build_model(_cfg(*opts))


def test_official_checkpoint_uses_the_detectors_copy_of_the_box_heads():
    """An official checkpoint holds the box heads twice; the official model computes with the
    ``bbox_embed.*`` copy (loaded last), so the converted decoder's copy is that one."""
    model = build_model(_cfg())
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    sd["refpoint_embed.weight"] = torch.randn(10, 4)
    for k in [k for k in sd if k.startswith("transformer.decoder.bbox_embed.")]:
        sd[k] = torch.randn_like(sd[k])  # a different (stale) copy
    out = convert_official({"model": sd}, num_classes=5)
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        torch.testing.assert_close(out["transformer.decoder." + k], sd[k])
