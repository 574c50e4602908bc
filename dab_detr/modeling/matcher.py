"""Hungarian matching of predictions to ground truth, with DAB-DETR's focal class cost or
DETR's softmax one.

Shapes: B batch, NQ queries, K classes, N_i target boxes of image i, N = sum_i N_i.
Boxes are cxcywh normalised to [0, 1].
"""

from typing import Dict, List, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class * focal + w_bbox * L1 - w_giou * GIoU``
    (with ``softmax``, DETR's ``-w_class * p(class)`` in place of the focal term)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        softmax: bool = False,
    ):
        """
        Args:
            cost_class, cost_bbox, cost_giou: weights of the three costs.
            focal_alpha, focal_gamma: of the focal class cost.
            softmax: DETR: the logits have K + 1 columns (the last: "no object") and the
                class cost is minus the softmax probability of the target class.
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.softmax = softmax

    def class_cost(self, pred_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(M, N)`` unweighted class cost of ``(M, K)`` (K + 1 with ``softmax``) logits for
        ``(N,)`` target classes."""
        if self.softmax:
            return -pred_logits.softmax(-1)[:, labels]
        prob = pred_logits.sigmoid()[:, labels]  # (M, N)
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob**g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        return pos - neg

    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, labels: torch.Tensor,
        boxes: torch.Tensor,
    ) -> torch.Tensor:
        """Cost of assigning every prediction to every target.

        Args:
            pred_logits: ``(M, K)`` class logits (``(M, K + 1)`` with ``softmax``).
            pred_boxes: ``(M, 4)`` predicted boxes.
            labels: ``(N,)`` target classes in [0, K).
            boxes: ``(N, 4)`` target boxes.

        Returns:
            ``(M, N)`` costs.
        """
        cost_bbox = torch.cdist(pred_boxes, boxes, p=1)
        giou = generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(boxes, "cxcywh", "xyxy")
        )
        return (self.cost_class * self.class_cost(pred_logits, labels)
                + self.cost_bbox * cost_bbox - self.cost_giou * giou)

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, NQ, K)`` and ``pred_boxes`` ``(B, NQ, 4)``.
            targets: per image, ``labels`` ``(N_i,)`` int64 and ``boxes`` ``(N_i, 4)``.

        Returns:
            Per image, ``(query_idx, target_idx)``: int64 tensors of length min(NQ, N_i) on the
            predictions' device; ``target_idx[j]`` is matched to ``query_idx[j]``.
        """
        b, nq = outputs["pred_logits"].shape[:2]
        device = outputs["pred_logits"].device
        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        # One cost matrix for the whole batch, (B * NQ, N), split per image below.
        cost = self.cost_matrix(
            outputs["pred_logits"].flatten(0, 1).float(),
            outputs["pred_boxes"].flatten(0, 1).float(),
            labels,
            boxes.float(),
        )
        # the assignment is solved on the host: one host-device synchronisation per matched
        # layer, the only ones of a training step's forward
        cost = cost.view(b, nq, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        pairs = [linear_sum_assignment(c[i].numpy()) for i, c in enumerate(cost.split(sizes, -1))]
        # (2, sum of min(NQ, N_i)): every image's (rows; cols), sent to the device in one copy
        # that does not wait for it (the losses index the predictions with them)
        flat = torch.as_tensor(np.concatenate([np.stack(p) for p in pairs], axis=1),
                               dtype=torch.int64).to(device, non_blocking=True)
        return [(chunk[0], chunk[1]) for chunk in flat.split([len(r) for r, _ in pairs], dim=1)]
