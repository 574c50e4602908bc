"""The DAB-DETR meta-architecture: Detectron2 inputs and outputs around the plain-PyTorch
transformer, matcher and criterion.

Shapes: B batch, C channels, H x W feature map, Q anchors, NQ decoder queries, K classes,
L decoder layers, D anchor dims. Boxes inside the model are cxcywh normalised by the size
of the (unpadded) input image.
"""

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from .box_ops import inverse_sigmoid
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .mlp import MLP
from .position_encoding import PositionEmbeddingSine
from .transformer import DABTransformer

__all__ = ["DABDETR"]

_ACTIVATIONS = {"prelu": nn.PReLU, "relu": nn.ReLU, "gelu": nn.GELU}


@META_ARCH_REGISTRY.register()
class DABDETR(nn.Module):
    """DAB-DETR (Liu et al., ICLR 2022): DETR whose queries are dynamic anchor boxes."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        position_embedding: PositionEmbeddingSine,
        transformer: DABTransformer,
        bbox_embed: nn.Module,
        num_classes: int,
        num_queries: int,
        query_dim: int = 4,
        random_refpoints_xy: bool = False,
        criterion: SetCriterion,
        aux_loss: bool = True,
        num_select: int = 300,
        pixel_mean: List[float],
        pixel_std: List[float],
    ):
        """
        Args:
            backbone: a Detectron2 backbone; its ``in_feature`` output is used.
            position_embedding: sine encoding of the feature-map positions.
            transformer: encoder-decoder; its decoder refines anchors with ``bbox_embed``.
            bbox_embed: box head (or ``nn.ModuleList``, one per decoder layer), shared by the
                predictions and the decoder's anchor updates.
            num_classes: K, foreground classes (sigmoid scores, no background class).
            num_queries: Q anchors.
            query_dim: D, 4 for anchor boxes, 2 for anchor points.
            random_refpoints_xy: anchor centres drawn uniformly in [0, 1] and never trained.
            criterion: training losses; its ``weight_dict`` weights them.
            aux_loss: also supervise the earlier decoder layers.
            num_select: detections kept per image, top-k over queries x classes.
            pixel_mean, pixel_std: per-channel normalisation, in the input channel order.
        """
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        self.position_embedding = position_embedding
        self.transformer = transformer
        hidden_dim = transformer.d_model
        in_channels = backbone.output_shape()[in_feature].channels
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = bbox_embed
        self.num_classes = num_classes
        self.query_dim = query_dim
        # Anchors in inverse-sigmoid space, N(0, 1) as nn.Embedding initialises them.
        if random_refpoints_xy:
            # fixxy: the centres are a buffer, so neither gradients nor weight decay move them
            self.refpoint_embed = nn.Embedding(num_queries, query_dim - 2)
            self.register_buffer("refpoint_xy", inverse_sigmoid(torch.rand(num_queries, 2)))
        else:
            self.refpoint_embed = nn.Embedding(num_queries, query_dim)
            self.refpoint_xy = None
        self.criterion = criterion
        self.aux_loss = aux_loss
        self.num_select = num_select
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Focal-loss prior: every class starts at probability 0.01.
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        for head in bbox_embed if isinstance(bbox_embed, nn.ModuleList) else [bbox_embed]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        in_features = cfg.MODEL.RESNETS.OUT_FEATURES
        if len(in_features) != 1:
            raise ValueError(f"MODEL.RESNETS.OUT_FEATURES={in_features}: DAB-DETR uses one map")
        if d.ACTIVATION not in _ACTIVATIONS:
            raise ValueError(f"MODEL.DAB_DETR.ACTIVATION={d.ACTIVATION!r}; expected one of "
                             f"{sorted(_ACTIVATIONS)}")
        if d.RANDOM_REFPOINTS_XY and d.QUERY_DIM != 4:
            raise ValueError("MODEL.DAB_DETR.RANDOM_REFPOINTS_XY needs QUERY_DIM = 4")
        box_head = lambda: MLP(d.HIDDEN_DIM, d.HIDDEN_DIM, 4, 3)  # noqa: E731
        if d.BBOX_EMBED_DIFF_EACH_LAYER:
            bbox_embed = nn.ModuleList(box_head() for _ in range(d.DEC_LAYERS))
        else:
            bbox_embed = box_head()
        transformer = DABTransformer(
            d_model=d.HIDDEN_DIM,
            nhead=d.NHEADS,
            num_encoder_layers=d.ENC_LAYERS,
            num_decoder_layers=d.DEC_LAYERS,
            dim_feedforward=d.DIM_FEEDFORWARD,
            dropout=d.DROPOUT,
            activation=_ACTIVATIONS[d.ACTIVATION],
            num_patterns=d.NUM_PATTERNS,
            query_dim=d.QUERY_DIM,
            keep_query_pos=d.KEEP_QUERY_POS,
            modulate_hw_attn=d.MODULATE_HW_ATTN,
            bbox_embed=bbox_embed if d.ITER_UPDATE else None,
        )
        matcher = HungarianMatcher(
            d.SET_COST_CLASS, d.SET_COST_BBOX, d.SET_COST_GIOU, d.FOCAL_ALPHA, d.FOCAL_GAMMA
        )
        weights = {"loss_ce": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT,
                   "loss_giou": d.GIOU_WEIGHT}
        if d.AUX_LOSS:
            weights.update({f"{k}_{i}": w for i in range(d.DEC_LAYERS - 1)
                            for k, w in list(weights.items())})
        return {
            "backbone": backbone,
            "in_feature": in_features[0],
            "position_embedding": PositionEmbeddingSine(
                d.HIDDEN_DIM // 2, d.PE_TEMPERATURE_H, d.PE_TEMPERATURE_W
            ),
            "transformer": transformer,
            "bbox_embed": bbox_embed,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "query_dim": d.QUERY_DIM,
            "random_refpoints_xy": d.RANDOM_REFPOINTS_XY,
            "criterion": SetCriterion(d.NUM_CLASSES, matcher, weights, d.FOCAL_ALPHA,
                                      d.FOCAL_GAMMA),
            "aux_loss": d.AUX_LOSS,
            "num_select": d.NUM_SELECT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def anchors(self) -> torch.Tensor:
        """``(Q, D)`` the learned anchors before the sigmoid."""
        if self.refpoint_xy is None:
            return self.refpoint_embed.weight
        return torch.cat([self.refpoint_xy, self.refpoint_embed.weight], dim=1)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and batch the images; padding is zero after normalisation."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """``(B, H, W)`` bool, True where ``images.tensor`` is padding."""
        sizes = torch.as_tensor(images.image_sizes, device=images.tensor.device)  # (B, 2)
        h, w = images.tensor.shape[-2:]
        rows = torch.arange(h, device=sizes.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(w, device=sizes.device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True
    ) -> Dict[str, torch.Tensor]:
        """Raw predictions of the last decoder layer, and of the others with ``with_aux``.

        Args:
            images: normalised images, as ``preprocess_image`` batches them.
            with_aux: also predict classes and boxes from the earlier layers' outputs.
                Inference needs only the last layer's; the earlier layers still refine the
                anchors inside the decoder either way.

        Returns:
            ``pred_logits`` ``(B, NQ, K)`` and ``pred_boxes`` ``(B, NQ, 4)`` of the last layer,
            and with ``with_aux``, ``aux_outputs``: a list of such dicts for the other layers.
        """
        # oneDNN's convolutions are faster on channels-last maps (and the flattened tokens
        # then need no transposing copy); the results are the same up to rounding
        pixels = images.tensor.contiguous(memory_format=torch.channels_last)
        features = self.backbone(pixels)[self.in_feature]
        # The padding mask follows the features down: nearest-neighbour, as in DETR.
        mask = F.interpolate(self.padding_mask(images)[None].float(), size=features.shape[-2:])
        mask = mask.to(torch.bool)[0]
        pos = self.position_embedding(mask).to(features.dtype)
        hs, references = self.transformer(self.input_proj(features), mask, self.anchors(), pos)
        if not with_aux:
            # (L, B, NQ, C) -> (1, B, NQ, C): heads only on the last layer
            hs, references = hs[-1:], references[-1:]
        logits = self.class_embed(hs)  # (L|1, B, NQ, K)
        boxes = self._predict_boxes(hs, references)  # (L|1, B, NQ, 4)
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if with_aux:
            outputs["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return outputs

    def _predict_boxes(self, hs: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes ``(N, B, NQ, 4)`` refining anchors ``references`` ``(N|1, B, NQ, D)`` from
        the last N layers' outputs ``hs`` ``(N, B, NQ, C)``."""
        if isinstance(self.bbox_embed, nn.ModuleList):
            heads = self.bbox_embed[len(self.bbox_embed) - len(hs) :]  # the last N heads
            delta = torch.stack([head(h) for head, h in zip(heads, hs)])
        else:
            delta = self.bbox_embed(hs)
        d = self.query_dim
        delta = torch.cat([delta[..., :d] + inverse_sigmoid(references), delta[..., d:]], -1)
        return delta.sigmoid()

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts with ``image`` ``(3, H, W)``, and in
                training ``instances`` (``gt_boxes`` XYXY in input pixels, ``gt_classes``).

        Returns:
            In training, the weighted losses. In inference, per image
            ``{"instances": Instances}`` with ``pred_boxes`` (XYXY, original image pixels),
            ``scores`` and ``pred_classes``.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.forward_predictions(images, with_aux=self.training and self.aux_loss)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            # Under autocast (SOLVER.AMP.ENABLED) the network runs in half precision; the
            # matching costs and the set losses are computed in float32.
            with torch.autocast(images.tensor.device.type, enabled=False):
                losses = self.criterion(_to_float32(outputs), targets)
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"],
                                 images.image_sizes)
        processed = []
        for result, inp, size in zip(results, batched_inputs, images.image_sizes):
            height, width = inp.get("height", size[0]), inp.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image, ``labels`` ``(N,)`` and ``boxes`` ``(N, 4)`` cxcywh normalised by the
        image size."""
        targets = []
        for inp, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = inp["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def inference(
        self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: List[tuple]
    ) -> List[Instances]:
        """Top-k over queries x classes of the sigmoid scores.

        Args:
            logits: ``(B, NQ, K)``.
            boxes: ``(B, NQ, 4)`` cxcywh normalised.
            image_sizes: per image ``(h, w)`` of the input (before padding).

        Returns:
            Per image, ``Instances`` of ``num_select`` detections in input pixels.
        """
        b, nq, k = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_select, nq * k), dim=1)
        query = torch.div(index, k, rounding_mode="floor")  # (B, num_select)
        boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        boxes = box_convert(boxes, "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            scale = torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            result.pred_boxes = Boxes(boxes[i] * scale)
            result.scores = scores[i]
            result.pred_classes = index[i] % k
            results.append(result)
        return results


def _to_float32(outputs):
    """``outputs`` (tensors in dicts and lists) with floating-point tensors in float32."""
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float32(v) for v in outputs]
    return outputs.float() if outputs.is_floating_point() else outputs
