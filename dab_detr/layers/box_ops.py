"""Box utilities not provided by torchvision.

Conversions and GIoU come from ``torchvision.ops`` (``box_convert``, ``generalized_box_iou``,
``generalized_box_iou_loss``); this module adds the inverse sigmoid and the anchor update
built on it, the one place that formula is written.
"""

import torch

__all__ = ["inverse_sigmoid", "refine_boxes"]


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
