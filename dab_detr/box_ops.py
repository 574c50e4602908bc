"""Box utilities not provided by torchvision.

Conversions and GIoU come from ``torchvision.ops`` (``box_convert``, ``generalized_box_iou``,
``generalized_box_iou_loss``); this module only adds the inverse sigmoid used by the anchor
updates.
"""

import torch

__all__ = ["inverse_sigmoid"]


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
