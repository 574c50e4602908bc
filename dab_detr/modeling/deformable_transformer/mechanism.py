"""Where DAB-Deformable-DETR's (and DINO's) decoder looks, in numbers that can be drawn.

In decoder layer n the cross-attention of a query samples, per head and feature level, P
points around its anchor (the anchor scaled to the level's padded map by the level's valid
ratios: ``reference_boxes``) at offsets predicted from the query, in fractions of the anchor's
size, and averages them with weights that sum to 1 over the levels and points of a head.
``trace_sampling`` records, with forward hooks, the anchors each layer used and those
locations and weights, computed by the layer's own ``MSDeformAttn.sampling_locations_and_weights``
on the inputs it was called with; ``level_to_pixels`` places a level's locations on the input
image.

DINO's decoder is DAB-Deformable-DETR's: the same trace. Its first anchors are the selected
encoder proposals (``outputs["interm_outputs"]["pred_boxes"]``), and a layer's next anchors are
the refinement of its raw output, while the boxes it reports are made from its normed output
(and, looking forward twice, refine the previous layer's boxes): unlike DAB-Deformable-DETR's,
``anchors[n + 1]`` are not layer n's ``aux_outputs`` boxes.

Shapes: N decoder layers, NQ queries, h heads, L levels of H_l x W_l (padded), P points per
head and level. Anchors are cxcywh normalised by the unpadded input image; locations are
normalised ``(x, y)`` in each level's padded map, (0, 0) its top-left corner, (1, 1) its
bottom-right corner.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ...layers import level_shapes
from ..transformer.mechanism import call_argument, predict_with_hooks

__all__ = ["SamplingTrace", "level_strides", "level_to_pixels", "trace_sampling"]


@dataclass
class SamplingTrace:
    """What a DAB-Deformable-DETR's (or DINO's) decoder did for one image.

    Attributes:
        outputs: the model's ``forward_predictions`` (``pred_logits``, ``pred_boxes``,
            ``aux_outputs``): ``(1, NQ, K)`` logits and ``(1, NQ, 4)`` cxcywh boxes per layer;
            DINO's also ``interm_outputs``, the selected proposals' logits and boxes (the
            first anchors).
        anchors: ``(N, NQ, 4)`` the anchors each layer used (the decoder's ``references``).
        reference_boxes: ``(N, NQ, L, 4)`` the same anchors scaled to each level's padded
            map: the reference boxes of the cross-attention.
        locations: ``(N, NQ, h, L, P, 2)`` sampling locations, normalised ``(x, y)`` in each
            level's padded map.
        weights: ``(N, NQ, h, L, P)`` their attention weights (a head's sum to 1 over L x P).
        spatial_shapes: ``(L, 2)`` long, ``(H_l, W_l)`` of each padded level.
        valid_sizes: ``(L, 2)`` long, ``(h_l, w_l)`` of each level's unpadded part.
        image_size: ``(h, w)`` of the unpadded input image, in pixels.
    """

    outputs: Dict[str, Any]
    anchors: torch.Tensor
    reference_boxes: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor
    spatial_shapes: torch.Tensor
    valid_sizes: torch.Tensor
    image_size: Tuple[int, int]


@torch.no_grad()
def trace_sampling(model: nn.Module, images: Any) -> SamplingTrace:
    """Run ``model.forward_predictions(images)`` on one image and record its decoder's
    anchors, sampling locations and attention weights.

    Args:
        model: a ``DABDeformableDETR`` or ``DINO`` in eval mode.
        images: an ``ImageList`` of one image, as ``model.preprocess_image`` makes it.
    """
    if len(images) != 1:
        raise ValueError(f"trace_sampling takes one image, got {len(images)}")
    seen: Dict[str, Any] = {"locations": [], "weights": [], "reference_boxes": []}

    def on_transformer(module, args, kwargs):
        # L masks (1, H_l, W_l), True at padding (bottom and right)
        seen["masks"] = call_argument(module, "masks", args, kwargs)

    def on_decoder(module, args, kwargs, output):
        seen["references"] = output[2][:, 0]  # (N, NQ, 4)

    def on_cross_attn(module, args, kwargs):
        reference_boxes = call_argument(module, "reference_points", args, kwargs)
        shapes = call_argument(module, "input_spatial_shapes", args, kwargs)
        # the attention's own computation, on the inputs of this call
        locations, weights = module.sampling_locations_and_weights(
            call_argument(module, "query", args, kwargs), reference_boxes, shapes
        )
        # the transformer passes (H_l, W_l) ints (SpatialShapes); the trace keeps a tensor
        seen["spatial_shapes"] = torch.tensor(level_shapes(shapes))
        seen["reference_boxes"].append(reference_boxes[0])
        seen["locations"].append(locations[0])
        seen["weights"].append(weights[0])

    decoder = model.transformer.decoder
    hooks = [
        model.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
        decoder.register_forward_hook(on_decoder, with_kwargs=True),
    ]
    hooks += [layer.cross_attn.register_forward_pre_hook(on_cross_attn, with_kwargs=True)
              for layer in decoder.layers]
    outputs = predict_with_hooks(model, images, hooks)
    return SamplingTrace(
        outputs=outputs,
        anchors=seen["references"],
        reference_boxes=torch.stack(seen["reference_boxes"]),
        locations=torch.stack(seen["locations"]),
        weights=torch.stack(seen["weights"]),
        spatial_shapes=seen["spatial_shapes"],
        valid_sizes=torch.stack([_valid_size(mask[0]) for mask in seen["masks"]]),
        image_size=tuple(images.image_sizes[0]),
    )


def _valid_size(mask: torch.Tensor) -> torch.Tensor:
    """``(2,)`` ``(h, w)`` of the unpadded part of an ``(H, W)`` mask, True at padding."""
    valid = ~mask
    return torch.stack([valid[:, 0].sum(), valid[0].sum()])


def level_strides(model: nn.Module) -> List[int]:
    """The stride of each of a ``DABDeformableDETR``'s (or ``DINO``'s) L levels, in input
    pixels: the backbone's for its maps, doubled for each level beyond them (``input_proj``'s
    stride-2 convolutions)."""
    shapes = model.backbone.output_shape()
    strides = [shapes[name].stride for name in model.in_features]
    while len(strides) < len(model.input_proj):
        strides.append(2 * strides[-1])
    return strides


def level_to_pixels(
    points: torch.Tensor, spatial_shapes: torch.Tensor, strides: List[int]
) -> torch.Tensor:
    """Normalised ``(x, y)`` in each level's padded map to pixels of the padded input image.

    Pixel ``k`` of level l covers input pixels ``[k s_l, (k + 1) s_l)`` (s_l its stride) and
    location ``x`` lies at ``x W_l - 0.5`` in pixels of the level (the bilinear sampling's
    convention), so at ``x W_l s_l`` input pixels. The unpadded image is the top-left
    ``(h, w)`` of the padded one: these are its pixels too.

    Args:
        points: ``(..., L, K, 2)`` per level, K points (or sizes: a cxcywh box is two).
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``.
        strides: the L strides s_l.

    Returns:
        ``(..., L, K, 2)`` pixels ``(x, y)``.
    """
    strides_t = torch.as_tensor(strides, dtype=points.dtype, device=points.device)
    # (L, 2) (H_l, W_l) -> (W_l, H_l) * s_l -> (L, 1, 2): each level's extent in input pixels
    extent = spatial_shapes.flip(-1).to(points.dtype) * strides_t[:, None]
    return points * extent[:, None]
