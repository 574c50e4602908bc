"""DETR's and Conditional DETR's own parts, against direct computations: DETR's softmax class
loss and matching cost, its post-processing, Conditional DETR's fixed reference points, the
keys both refuse and the official converter's recognition of their checkpoints. (Their outputs
are checked against the official code in test_equivalence_official.py.)"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from conftest import SMALL, config_path
from dab_detr.checkpoint import convert_official
from dab_detr.config import get_dab_detr_cfg
from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.matcher import HungarianMatcher
from dab_detr.utils.user_errors import InputValueError

DETR = config_path("quick_schedules/detr_R_18_shapes.yaml")
CONDITIONAL_DETR = config_path("quick_schedules/conditional_detr_R_18_shapes.yaml")


def _small(config_file: str, *opts: str) -> torch.nn.Module:
    return build_model(get_dab_detr_cfg(config_file, ["MODEL.WEIGHTS", "", *SMALL, *opts]))


def test_softmax_matching_cost_is_minus_the_target_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)  # K = 3 classes and "no object"
    boxes = torch.rand(5, 2, generator=g) * 0.5 + 0.25
    pred = torch.cat([boxes, torch.full((5, 2), 0.2)], 1)
    labels, target = torch.tensor([2, 0]), pred[[1, 3]] + 0.01
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0, softmax=True)
    cost = matcher.cost_matrix(logits, pred, labels, target)
    prob = logits.exp() / logits.exp().sum(1, keepdim=True)
    torch.testing.assert_close(cost, -prob[:, [2, 0]])


def test_softmax_class_loss_weights_no_object():
    """DETR's loss_ce: cross-entropy over K + 1 classes, unmatched queries' target "no object"
    (weight 0.1), averaged over the targets' weights; written out here."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g)  # B = 2, NQ = 3, K = 3 (+ "no object")
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]])}]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([2, 0]), torch.tensor([0, 1]))]
    criterion = SetCriterion(3, HungarianMatcher(softmax=True), {}, no_object_weight=0.1)
    got = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_boxes=3.0)
    classes = torch.tensor([[3, 2, 3], [1, 3, 0]])  # query -> target class, 3: no object
    weight = torch.where(classes == 3, 0.1, 1.0)
    nll = -logits.log_softmax(-1).gather(2, classes[..., None])[..., 0]
    torch.testing.assert_close(got["loss_ce"], (weight * nll).sum() / weight.sum())
    # nothing matched: every query is "no object"
    none = [(torch.tensor([], dtype=torch.int64),) * 2] * 2
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    got = criterion.loss_labels({"pred_logits": logits}, empty, none, num_boxes=1.0)
    torch.testing.assert_close(got["loss_ce"], F.cross_entropy(logits.flatten(0, 1),
                                                               torch.full((6,), 3)))


@pytest.mark.parametrize("config_file, softmax", [(DETR, True), (CONDITIONAL_DETR, False)])
def test_the_configs_criterion_and_matcher(config_file, softmax):
    """DETR's model, built from its config, matches and classifies by softmax ("no object"
    weighted 0.1); Conditional DETR's by focal cost and loss."""
    model = _small(config_file)
    matcher, criterion = model.criterion.matcher, model.criterion
    g = torch.Generator().manual_seed(2)
    k = 5 + softmax
    logits, labels = torch.randn(4, k, generator=g), torch.tensor([1, 4])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)
    cost = matcher.cost_matrix(logits, boxes, labels, boxes[:2])
    # the boxes are equal: only the class term differs between predictions
    if softmax:
        expected = -matcher.cost_class * logits.softmax(-1)[:, labels]
        assert criterion.no_object_weight == 0.1
    else:
        p = logits.sigmoid()[:, labels]
        expected = matcher.cost_class * (0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
                                         - 0.75 * p**2 * -(1 - p + 1e-8).log())
        assert criterion.no_object_weight is None
    torch.testing.assert_close(cost - cost[:1], expected - expected[:1])


def test_detr_keeps_each_query_best_class():
    model = _small(DETR, "MODEL.DAB_DETR.NUM_SELECT", "3").eval()
    logits = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 0.0, 5.0],  # "no object" most likely
                            [3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 4.0, 0.0]]])  # 4 queries, K = 5 + 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 4]) + torch.arange(4.0)[None, :, None] * 0.01
    scores, classes, xyxy = model.top_detections(logits, boxes)
    prob = logits.softmax(-1)[0]
    # the three best queries by their best foreground class: 3 (class 4), 1 (0), 2 (3)
    assert classes.tolist() == [[4, 0, 3]]
    torch.testing.assert_close(scores[0], prob[[3, 1, 2], [4, 0, 3]])
    # query 3: cxcywh (0.53, 0.53, 0.23, 0.23)
    torch.testing.assert_close(xyxy[0, 0], torch.tensor([0.415, 0.415, 0.645, 0.645]))


def test_conditional_detr_reference_points_are_fixed_and_learned():
    """The decoder's reference points are sigmoid(ref_point_head(query_embed)), one set for
    every layer; the boxes are predicted relative to them."""
    model = _small(CONDITIONAL_DETR).eval()
    decoder = model.transformer.decoder
    seen = {}

    def record(module, args, output):
        seen["references"] = output[1]

    hook = decoder.register_forward_hook(record)
    images = model.preprocess_image([{"image": torch.rand(3, 64, 80) * 255}])
    with torch.no_grad():
        outputs = model.forward_predictions(images, with_aux=True)
        expected = decoder.ref_point_head(model.query_embed.weight).sigmoid()
    hook.remove()
    assert seen["references"].shape == (1, 1, 10, 2)  # (one set, B, NQ, 2)
    torch.testing.assert_close(seen["references"][0, 0], expected)
    # no parameter of DAB-DETR's anchors
    names = dict(model.named_parameters())
    assert "refpoint_embed.weight" not in names and names["query_embed.weight"].shape == (10, 64)
    assert len(outputs["aux_outputs"]) == 1


def test_conditional_detr_boxes_use_its_inverse_sigmoid_clamp():
    """Boxes refine the reference points through Conditional DETR's inverse sigmoid, clamped
    at 1e-5 (DAB-DETR's: 1e-3): points near the border keep their logit down to 1e-5."""
    model = _small(CONDITIONAL_DETR)
    ref = torch.tensor([[[[1e-4, 0.5]], [[0.5, 1 - 2e-5]]]]).transpose(1, 2)  # (1, 1, 2, 2)
    hs = torch.randn(1, 1, 2, 64)
    delta = model.bbox_embed(hs)
    boxes = model._predict_boxes(hs, ref)
    logit = torch.log(ref.clamp(min=1e-5) / (1 - ref).clamp(min=1e-5))
    expected = torch.cat([delta[..., :2] + logit, delta[..., 2:]], -1).sigmoid()
    torch.testing.assert_close(boxes, expected)
    # DAB-DETR's clamp would have moved these points
    assert (torch.log(ref.clamp(min=1e-3) / (1 - ref).clamp(min=1e-3)) - logit).abs().max() > 2


@pytest.mark.parametrize("config_file", [DETR, CONDITIONAL_DETR])
@pytest.mark.parametrize("key", ["DN.ENABLED", "NUM_PATTERNS", "RANDOM_REFPOINTS_XY"])
def test_dab_detr_options_are_refused(config_file, key):
    value = "3" if key == "NUM_PATTERNS" else "True"
    with pytest.raises(ValueError, match=f"MODEL.DAB_DETR.{key}="):
        _small(config_file, f"MODEL.DAB_DETR.{key}", value)


def test_official_converter_names_the_models_it_knows():
    with pytest.raises(InputValueError,
                       match=r"DN-DETR, DETR, Conditional DETR or DINO.*keys: query_"):
        convert_official({"query_embed.weight": torch.zeros(2, 2)})
