"""Box utilities not provided by torchvision.

Conversions and the pairwise GIoU come from ``torchvision.ops`` (``box_convert``,
``generalized_box_iou``); this module adds the inverse sigmoid and the anchor update built on
it, the one place that formula is written, and the GIoU loss of matched pairs without
torchvision's boolean-mask indexing (which waits for the GPU).

Shapes: M matched pairs. Boxes are xyxy unless said otherwise.
"""

import torch

__all__ = ["inverse_sigmoid", "paired_giou_loss", "refine_boxes"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Logit of ``x`` clamped to [0, 1], each side kept at least ``eps`` from 0.

    Args:
        x: tensor of values in [0, 1], any shape (e.g. boxes ``(..., 4)`` cxcywh in [0, 1]).
        eps: the reference implementation's 1e-3 bounds the result to about +-6.9, which keeps
            an anchor at the image border trainable.

    Returns:
        ``log(x / (1 - x))`` with the clamps, same shape as ``x``.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(
    reference: torch.Tensor, delta: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """The anchor update of DAB-DETR (and of Deformable DETR's box refinement):
    ``sigmoid(delta + inverse_sigmoid(reference))`` on the reference's coordinates.

    Args:
        reference: ``(..., D)`` boxes or points normalised to [0, 1]: D = 4 for cxcywh
            anchors, 2 for (cx, cy) anchor points.
        delta: ``(..., 4)`` head output in inverse-sigmoid space; its first D entries move the
            reference, the others (w, h for anchor points) are predicted from zero.

    Returns:
        ``(..., 4)`` refined boxes, cxcywh in [0, 1]; float32 (float64 for float64 inputs)
        under autocast too, where the head's ``delta`` is half precision: a bfloat16 box is
        1/256 of the image off near 1.0.
    """
    d = reference.shape[-1]
    dtype = torch.promote_types(torch.promote_types(reference.dtype, delta.dtype), torch.float32)
    reference, delta = reference.to(dtype), delta.to(dtype)
    moved = delta[..., :d] + inverse_sigmoid(reference, eps)
    return torch.cat([moved, delta[..., d:]], -1).sigmoid()


def paired_giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor,
                     eps: float = 1e-7) -> torch.Tensor:
    """``1 - GIoU`` of each pair: torchvision's ``generalized_box_iou_loss(reduction="none")``,
    its intersection clamped at 0 where torchvision selects the overlapping pairs with a
    boolean mask (a data-dependent size: the host waits for the GPU).

    Args:
        boxes1, boxes2: ``(M, 4)`` xyxy boxes, pair i being ``(boxes1[i], boxes2[i])``.
        eps: added to the union and to the enclosing area, as torchvision does.

    Returns:
        ``(M,)`` losses in [0, 2].
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    inter_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    inter_h = (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    # the smallest box enclosing both
    enclosing_w = torch.max(x2, x2g) - torch.min(x1, x1g)
    enclosing = enclosing_w * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))
