"""Box utilities (inverse sigmoid, GIoU as the matcher and the criterion use it) and the
Hungarian matcher: hand-computed values, batched vs per-image matching, empty targets,
optimality against brute force."""

import itertools
import math

import torch
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

from dab_detr.layers.box_ops import inverse_sigmoid, paired_giou_loss
from dab_detr.modeling.matcher import HungarianMatcher


def test_inverse_sigmoid_values():
    x = torch.tensor([0.5, 0.75, 0.25, 0.9, 0.0, 1.0, 5e-4, 0.9995, -0.2, 1.3])
    expected = torch.tensor([
        0.0,
        math.log(3.0),
        -math.log(3.0),
        math.log(9.0),
        math.log(1e-3),  # 0 -> clamped numerator 1e-3
        math.log(1e3),  # 1 -> clamped denominator 1e-3
        math.log(1e-3 / 0.9995),  # below eps: numerator clamped, denominator not
        math.log(0.9995 / 1e-3),
        math.log(1e-3),  # out of [0, 1]: clamped to 0 first
        math.log(1e3),
    ])
    torch.testing.assert_close(inverse_sigmoid(x), expected)
    # a different eps moves the bounds
    torch.testing.assert_close(
        inverse_sigmoid(torch.tensor([0.0, 1.0, 0.5]), eps=1e-5),
        torch.tensor([math.log(1e-5), math.log(1e5), 0.0]),
    )


def test_inverse_sigmoid_inverts_sigmoid():
    logits = torch.linspace(-6.5, 6.5, 27)
    torch.testing.assert_close(inverse_sigmoid(logits.sigmoid()), logits, rtol=0, atol=1e-4)


# xyxy boxes; a1/b1 overlap, a1/b2 and a2/b* are nested, a1/b3 are disjoint
A = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
B = torch.tensor([[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
# GIoU = inter / union - (enclosing - union) / enclosing, worked out by hand
GIOU_AB = torch.tensor([
    [1 / 7 - 2 / 9, 1 / 4, 0 - 3 / 8],  # a1: union 7 in a 3x3 hull; nested 1 in 4; 5 in 4x2
    [4 / 16, 1 / 16, 1 / 16],  # a2 contains every b
])


def test_generalized_box_iou_hand_values():
    torch.testing.assert_close(generalized_box_iou(A, B), GIOU_AB)


def test_generalized_box_iou_loss_hand_values():
    """The criterion's GIoU loss: 1 - GIoU of paired boxes (torchvision's, and ours without
    its boolean-mask indexing)."""
    pairs1 = torch.stack([A[0], A[0], A[0], A[1]])
    pairs2 = torch.stack([B[0], B[1], B[2], B[1]])
    expected = 1 - torch.tensor([1 / 7 - 2 / 9, 1 / 4, -3 / 8, 1 / 16])
    torch.testing.assert_close(generalized_box_iou_loss(pairs1, pairs2), expected)
    torch.testing.assert_close(
        generalized_box_iou_loss(pairs1, pairs2, reduction="sum"), expected.sum()
    )
    torch.testing.assert_close(paired_giou_loss(pairs1, pairs2), expected)


def test_paired_giou_loss_equals_torchvisions_with_its_gradients():
    """Overlapping, disjoint and identical pairs: the values and gradients of torchvision's
    ``generalized_box_iou_loss``."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(200, 2, 2, generator=g) * 0.3], -1)
    b1, b2 = boxes[:, 0].double(), boxes[:, 1].double()
    b2[:10] = b1[:10]  # identical
    b1.requires_grad_(True)
    ours = paired_giou_loss(b1, b2)
    theirs = generalized_box_iou_loss(b1, b2)
    assert (ours > 1).any() and (ours < 1).any()  # disjoint pairs and overlapping ones
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours.sum(), b1)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), b1)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=1e-12)


def _cxcywh_giou(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU ``(M, N)`` of cxcywh boxes, written out directly."""
    x1 = torch.stack([b1[:, 0] - b1[:, 2] / 2, b1[:, 1] - b1[:, 3] / 2,
                      b1[:, 0] + b1[:, 2] / 2, b1[:, 1] + b1[:, 3] / 2], 1)[:, None]
    x2 = torch.stack([b2[:, 0] - b2[:, 2] / 2, b2[:, 1] - b2[:, 3] / 2,
                      b2[:, 0] + b2[:, 2] / 2, b2[:, 1] + b2[:, 3] / 2], 1)[None]
    iw = (torch.minimum(x1[..., 2], x2[..., 2]) - torch.maximum(x1[..., 0], x2[..., 0])).clamp(0)
    ih = (torch.minimum(x1[..., 3], x2[..., 3]) - torch.maximum(x1[..., 1], x2[..., 1])).clamp(0)
    inter = iw * ih
    union = (b1[:, 2] * b1[:, 3])[:, None] + (b2[:, 2] * b2[:, 3])[None] - inter
    hull = ((torch.maximum(x1[..., 2], x2[..., 2]) - torch.minimum(x1[..., 0], x2[..., 0]))
            * (torch.maximum(x1[..., 3], x2[..., 3]) - torch.minimum(x1[..., 1], x2[..., 1])))
    return inter / union - (hull - union) / hull


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 4)`` cxcywh boxes well inside [0, 1]."""
    centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centres, sizes], 1)


def _random_problem(b: int, nq: int, k: int, sizes, seed: int):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(b, nq, k, generator=g) * 2,
        "pred_boxes": _random_boxes(b * nq, g).view(b, nq, 4),
    }
    targets = [
        {"labels": torch.randint(0, k, (n,), generator=g), "boxes": _random_boxes(n, g)}
        for n in sizes
    ]
    return outputs, targets


def test_cost_matrix_direct():
    outputs, targets = _random_problem(1, 6, 4, [3], seed=0)
    logits, pred = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    labels, boxes = targets[0]["labels"], targets[0]["boxes"]
    prob = logits.sigmoid()
    cost = torch.empty(6, 3)
    for j in range(3):
        p = prob[:, labels[j]]
        focal_pos = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8)
        focal_neg = 0.75 * p**2 * -torch.log(1 - p + 1e-8)
        l1 = (pred - boxes[j]).abs().sum(1)
        cost[:, j] = 2 * (focal_pos - focal_neg) + 5 * l1
    cost = cost - 2 * _cxcywh_giou(pred, boxes)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    torch.testing.assert_close(matcher.cost_matrix(logits, pred, labels, boxes), cost)


def test_batched_matching_equals_per_image():
    outputs, targets = _random_problem(4, 7, 5, [3, 0, 7, 1], seed=1)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == 4
    for i, (rows, cols) in enumerate(batched):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]])
        torch.testing.assert_close(rows, single[0][0], rtol=0, atol=0)
        torch.testing.assert_close(cols, single[0][1], rtol=0, atol=0)
        n = len(targets[i]["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == n
        # every target matched once, queries distinct
        torch.testing.assert_close(cols.sort().values, torch.arange(n), rtol=0, atol=0)
        assert len(set(rows.tolist())) == n


def test_empty_targets():
    outputs, targets = _random_problem(2, 5, 3, [2, 0], seed=2)
    indices = HungarianMatcher()(outputs, targets)
    empty = torch.zeros(0, dtype=torch.int64)
    torch.testing.assert_close(indices[1][0], empty, rtol=0, atol=0)
    torch.testing.assert_close(indices[1][1], empty, rtol=0, atol=0)
    assert len(indices[0][0]) == 2
    # a batch without any target
    outputs, targets = _random_problem(2, 5, 3, [0, 0], seed=3)
    for rows, cols in HungarianMatcher()(outputs, targets):
        torch.testing.assert_close(rows, empty, rtol=0, atol=0)
        torch.testing.assert_close(cols, empty, rtol=0, atol=0)


def test_matching_is_optimal():
    """Total cost of the matching equals the minimum over all injective assignments."""
    matcher = HungarianMatcher()
    for seed in range(10):
        outputs, targets = _random_problem(1, 5, 4, [3], seed=10 + seed)
        cost = matcher.cost_matrix(
            outputs["pred_logits"][0], outputs["pred_boxes"][0],
            targets[0]["labels"], targets[0]["boxes"],
        )
        rows, cols = matcher(outputs, targets)[0]
        best = min(
            sum(cost[q, t].item() for t, q in enumerate(queries))
            for queries in itertools.permutations(range(5), 3)
        )
        assert math.isclose(cost[rows, cols].sum().item(), best, rel_tol=1e-6, abs_tol=1e-6)
