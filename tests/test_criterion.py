"""SetCriterion: every loss term against a direct computation for a fixed matching,
auxiliary losses, and the box count with empty targets."""

from typing import Dict, List

import torch

from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0

# B = 2 images, NQ = 4 queries, K = 3 classes; image 0 has 2 targets, image 1 has 1.
LABELS = [torch.tensor([2, 0]), torch.tensor([1])]
# fixed matching, per image (query_idx, target_idx); image 0 not in query order on purpose
INDICES = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]


class FixedMatcher:
    """Returns ``INDICES`` whatever the predictions."""

    def __call__(self, outputs, targets):
        return INDICES


def _targets(g: torch.Generator) -> List[Dict[str, torch.Tensor]]:
    return [{"labels": labels, "boxes": _boxes(len(labels), g)} for labels in LABELS]


def _boxes(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                      torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)


def _outputs(g: torch.Generator) -> Dict[str, torch.Tensor]:
    return {"pred_logits": torch.randn(2, 4, 3, generator=g) * 2,
            "pred_boxes": _boxes(8, g).view(2, 4, 4)}


def _focal(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Elementwise sigmoid focal loss, by case: -a (1-p)^g log p for positives and
    -(1-a) p^g log(1-p) for negatives."""
    p = logits.sigmoid()
    pos = -ALPHA * (1 - p) ** GAMMA * torch.log(p)
    neg = -(1 - ALPHA) * p**GAMMA * torch.log(1 - p)
    return torch.where(onehot > 0, pos, neg)


def _giou_cxcywh(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """GIoU of paired cxcywh boxes ``(N, 4)`` -> ``(N,)``."""
    lo1, hi1 = b1[:, :2] - b1[:, 2:] / 2, b1[:, :2] + b1[:, 2:] / 2
    lo2, hi2 = b2[:, :2] - b2[:, 2:] / 2, b2[:, :2] + b2[:, 2:] / 2
    inter = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0).prod(1)
    union = b1[:, 2:].prod(1) + b2[:, 2:].prod(1) - inter
    hull = (torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)).prod(1)
    return inter / union - (hull - union) / hull


def _expected(outputs, targets) -> Dict[str, torch.Tensor]:
    """The losses for ``INDICES``, written out for this fixed problem."""
    onehot = torch.zeros(2, 4, 3)
    onehot[0, 3, 2] = 1  # image 0: query 3 <- target 0 (class 2)
    onehot[0, 1, 0] = 1  # image 0: query 1 <- target 1 (class 0)
    onehot[1, 2, 1] = 1  # image 1: query 2 <- target 0 (class 1)
    src = torch.stack([outputs["pred_boxes"][0, 3], outputs["pred_boxes"][0, 1],
                       outputs["pred_boxes"][1, 2]])
    tgt = torch.stack([targets[0]["boxes"][0], targets[0]["boxes"][1], targets[1]["boxes"][0]])
    num_boxes = 3.0
    return {
        "loss_ce": _focal(outputs["pred_logits"], onehot).sum() / num_boxes,
        "loss_bbox": (src - tgt).abs().sum() / num_boxes,
        "loss_giou": (1 - _giou_cxcywh(src, tgt)).sum() / num_boxes,
    }


def _criterion(matcher=None) -> SetCriterion:
    return SetCriterion(3, matcher or FixedMatcher(), {}, focal_alpha=ALPHA, focal_gamma=GAMMA)


def test_loss_terms_direct():
    g = torch.Generator().manual_seed(0)
    outputs, targets = _outputs(g), _targets(g)
    criterion = _criterion()
    ce = criterion.loss_labels(outputs, targets, INDICES, 3.0)
    boxes = criterion.loss_boxes(outputs, targets, INDICES, 3.0)
    expected = _expected(outputs, targets)
    assert set(ce) == {"loss_ce"} and set(boxes) == {"loss_bbox", "loss_giou"}
    torch.testing.assert_close(ce["loss_ce"], expected["loss_ce"])
    torch.testing.assert_close(boxes["loss_bbox"], expected["loss_bbox"])
    torch.testing.assert_close(boxes["loss_giou"], expected["loss_giou"])


def test_forward_with_aux_losses():
    g = torch.Generator().manual_seed(1)
    outputs, targets = _outputs(g), _targets(g)
    aux = [_outputs(g), _outputs(g)]
    losses = _criterion()({**outputs, "aux_outputs": aux}, targets)
    expected = dict(_expected(outputs, targets))
    for i, a in enumerate(aux):
        expected.update({f"{k}_{i}": v for k, v in _expected(a, targets).items()})
    assert set(losses) == set(expected)
    assert len(expected) == 9
    for k in expected:
        torch.testing.assert_close(losses[k], expected[k], msg=k)


def test_forward_uses_the_matcher():
    """With the real matcher, the losses equal those of its own assignment."""
    g = torch.Generator().manual_seed(2)
    outputs, targets = _outputs(g), _targets(g)
    matcher = HungarianMatcher(focal_alpha=ALPHA, focal_gamma=GAMMA)
    criterion = _criterion(matcher)
    indices = matcher(outputs, targets)
    losses = criterion(outputs, targets)
    expected = criterion.loss_labels(outputs, targets, indices, 3.0)
    expected.update(criterion.loss_boxes(outputs, targets, indices, 3.0))
    assert set(losses) == set(expected)
    for k in expected:
        torch.testing.assert_close(losses[k], expected[k], msg=k)


def test_num_boxes():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert SetCriterion.num_boxes([empty, empty], torch.device("cpu")) == 1.0
    g = torch.Generator().manual_seed(3)
    assert SetCriterion.num_boxes(_targets(g) + [empty], torch.device("cpu")) == 3.0


def test_empty_targets():
    """No targets at all: every query is a negative, the box losses are zero, num_boxes 1."""
    g = torch.Generator().manual_seed(4)
    outputs = _outputs(g)
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    criterion = _criterion(HungarianMatcher(focal_alpha=ALPHA, focal_gamma=GAMMA))
    losses = criterion({**outputs, "aux_outputs": [_outputs(g)]}, [empty, empty])
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou",
                           "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    expected_ce = _focal(outputs["pred_logits"].detach(), torch.zeros(2, 4, 3)).sum() / 1.0
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    for k in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        torch.testing.assert_close(losses[k], torch.tensor(0.0), msg=k)
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    torch.testing.assert_close(outputs["pred_boxes"].grad, torch.zeros(2, 4, 4))


def test_one_image_without_targets():
    """Image 1 has no targets: its queries are all negatives, the box count is image 0's."""
    g = torch.Generator().manual_seed(5)
    outputs, targets = _outputs(g), _targets(g)
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = [INDICES[0], (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]

    class Matcher:
        def __call__(self, outputs, targets):
            return indices

    losses = _criterion(Matcher())(outputs, targets)
    onehot = torch.zeros(2, 4, 3)
    onehot[0, 3, 2] = 1
    onehot[0, 1, 0] = 1
    src = outputs["pred_boxes"][0, [3, 1]]
    tgt = targets[0]["boxes"]
    torch.testing.assert_close(losses["loss_ce"], _focal(outputs["pred_logits"], onehot).sum() / 2)
    torch.testing.assert_close(losses["loss_bbox"], (src - tgt).abs().sum() / 2)
    torch.testing.assert_close(losses["loss_giou"], (1 - _giou_cxcywh(src, tgt)).sum() / 2)
