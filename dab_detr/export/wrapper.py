"""The module that the ONNX export traces: a detector of this project from a padded batch
of normalised images and their sizes to its top-k detections, through the model's own
``forward_predictions`` (padding mask, backbone, position encodings, transformer, heads) and
``top_detections`` (the top-k of ``inference``), so that the graph computes nothing the model
does not.

Shapes: B batch, H x W the padded batch, S = min(NUM_SELECT, NQ * K) detections per image
(DINO: NQ = min(NUM_QUERIES, encoder tokens), which depends on H and W).
"""

from typing import Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

from ..modeling.meta_arch import DABDETR, DETR, DINO, ConditionalDETR, DABDeformableDETR

__all__ = ["EXPORTABLE", "ExportError", "ExportableDetector"]

# The meta-architectures the export knows, by their META_ARCH_REGISTRY names.
EXPORTABLE = {"DABDETR": DABDETR, "DABDeformableDETR": DABDeformableDETR, "DETR": DETR,
              "ConditionalDETR": ConditionalDETR, "DINO": DINO}


class ExportError(ValueError):
    """A config or model that cannot be exported to ONNX; the message names the part."""


class ExportableDetector(nn.Module):
    """``(images, image_sizes) -> (scores, classes, boxes)`` of a detector in eval mode."""

    def __init__(self, model: nn.Module):
        """
        Args:
            model: a model of :data:`EXPORTABLE`; put in eval mode.

        Raises:
            ExportError: for any other model.
        """
        super().__init__()
        if not isinstance(model, tuple(EXPORTABLE.values())):
            raise ExportError(
                f"{type(model).__name__}: the ONNX export supports the meta-architectures "
                f"{sorted(EXPORTABLE)}"
            )
        self.model = model
        self.eval()

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            images: ``(B, 3, H, W)`` float32, normalised as ``preprocess_image`` does and
                zero-padded at the bottom and right.
            image_sizes: ``(B, 2)`` int64 ``(h, w)`` of each image before padding.

        Returns:
            scores ``(B, S)`` the model's scores (sigmoid; DETR: softmax), best first;
            classes ``(B, S)`` int64; boxes ``(B, S, 4)`` XYXY in pixels of the unpadded image
            (``inference``'s boxes).
        """
        # An ImageList whose image_sizes is the (B, 2) tensor itself: padding_mask reads it as
        # it reads the list of tuples, and the mask stays a function of the graph's input
        # (Detectron2's own tracing support builds ImageLists of tensor sizes too).
        batch = ImageList(images, image_sizes)
        outputs = self.model.forward_predictions(batch, with_aux=False)
        scores, classes, boxes = self.model.top_detections(
            outputs["pred_logits"], outputs["pred_boxes"]
        )
        # (B, 2) (h, w) -> (B, 1, 4) (w, h, w, h): inference's scale to input pixels
        scale = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]
        return scores, classes, boxes * scale
