"""The baselines DAB-DETR is measured against: DETR (Carion et al., ECCV 2020) and Conditional
DETR (Meng et al., ICCV 2021), with the Detectron2 inputs, outputs, backbone, matcher and
criterion of the other models (``base.py``).

- ``DETR``: its own transformer (``modeling/transformer/detr.py``), 100 learned query
  positions, boxes an MLP and a sigmoid of each decoder output, softmax over K + 1 classes
  (the last "no object"); inference keeps each query's best class.
- ``ConditionalDETR``: DAB-DETR's network with the switches that make it Conditional DETR's
  (learned positional queries that give 2-D reference points, fixed through the layers;
  DETR's encoder), focal loss and top-k inference: a ``DABDETR`` subclass.

Shapes: B batch, C channels, NQ queries, K classes, L decoder layers. Boxes inside the models
are cxcywh normalised by the size of the (unpadded) input image.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import box_convert

from ...layers import MLP, PositionEmbeddingSine
from ..criterion import SetCriterion
from ..transformer import DABTransformer, DETRTransformer
from .base import (
    SingleScaleDetector,
    build_set_criterion,
    single_scale_from_config,
    transformer_from_config,
)
from .dab_detr import DABDETR

__all__ = ["ConditionalDETR", "DETR"]


def _refuse_dab_keys(cfg, model: str) -> None:
    """The DAB-DETR keys with no meaning for ``model`` that a user might set expecting one."""
    d = cfg.MODEL.DAB_DETR
    for key, value in (("DN.ENABLED", d.DN.ENABLED), ("NUM_PATTERNS", d.NUM_PATTERNS),
                       ("RANDOM_REFPOINTS_XY", d.RANDOM_REFPOINTS_XY),
                       ("BBOX_EMBED_DIFF_EACH_LAYER", d.BBOX_EMBED_DIFF_EACH_LAYER)):
        if value:
            raise ValueError(f"MODEL.DAB_DETR.{key}={value!r}: {model} has no such option")


@META_ARCH_REGISTRY.register()
class DETR(SingleScaleDetector):
    """DETR: learned queries, no reference points, softmax classification with "no object"."""

    # the class head has K + 1 rows, the last "no object" (read by the checkpointer)
    no_object_class = True

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        position_embedding: PositionEmbeddingSine,
        transformer: DETRTransformer,
        num_classes: int,
        num_queries: int,
        criterion: SetCriterion,
        aux_loss: bool = True,
        num_select: int = 100,
        pixel_mean: List[float],
        pixel_std: List[float],
    ):
        """
        Args:
            backbone: a Detectron2 backbone; its ``in_feature`` output is used.
            position_embedding: sine encoding of the feature-map positions.
            transformer: DETR's encoder-decoder.
            num_classes: K; the class head has K + 1 outputs, the last "no object".
            num_queries: NQ learned query positions (``query_embed``).
            criterion: training losses (softmax class loss); its ``weight_dict`` weights them.
            aux_loss: also supervise the earlier decoder layers.
            num_select: detections kept per image: the queries with the best scores, each
                with its best class.
            pixel_mean, pixel_std: per-channel normalisation, in the input channel order.
        """
        hidden_dim = transformer.d_model
        super().__init__(backbone=backbone, criterion=criterion, aux_loss=aux_loss,
                         num_select=num_select, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         in_feature=in_feature, position_embedding=position_embedding,
                         hidden_dim=hidden_dim)
        self.transformer = transformer
        self.num_classes = num_classes
        # DETR keeps PyTorch's default initialisation of its heads
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)  # C -> K + 1
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)  # C -> 4 (cxcywh before sigmoid)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # (NQ, C)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        common = single_scale_from_config(cfg, "DETR")
        _refuse_dab_keys(cfg, "DETR")
        transformer = DETRTransformer(**transformer_from_config(cfg))
        return {
            **common,
            "transformer": transformer,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "criterion": build_set_criterion(cfg, no_object_class=True),
        }

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True, targets: Optional[List[Dict]] = None
    ) -> Dict[str, Any]:
        """``pred_logits`` ``(B, NQ, K + 1)`` and ``pred_boxes`` ``(B, NQ, 4)`` of the last
        decoder layer, with ``with_aux`` ``aux_outputs`` of the others (``targets`` unused)."""
        src, mask, pos = self.feature_map(images)
        hs = self.transformer(src, mask, self.query_embed.weight, pos)  # (L, B, NQ, C)
        if not with_aux:
            hs = hs[-1:]
        return self.predictions(self.class_embed(hs), self.bbox_embed(hs).sigmoid(), with_aux)

    def top_detections(
        self, logits: torch.Tensor, boxes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DETR's post-processing: each query's best class by softmax ("no object" dropped),
        then the ``num_select`` best queries.

        Args:
            logits: ``(B, NQ, K + 1)``.
            boxes: ``(B, NQ, 4)`` cxcywh normalised.

        Returns:
            scores ``(B, S)`` best first, classes ``(B, S)`` int64 and boxes ``(B, S, 4)`` XYXY
            normalised by the image size, ``S = min(num_select, NQ)``.
        """
        scores, classes = logits.softmax(-1)[..., :-1].max(-1)  # (B, NQ)
        scores, query = scores.topk(min(self.num_select, scores.shape[1]), dim=1)
        classes = torch.gather(classes, 1, query)
        boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        return scores, classes, box_convert(boxes, "cxcywh", "xyxy")


@META_ARCH_REGISTRY.register()
class ConditionalDETR(DABDETR):
    """Conditional DETR: DAB-DETR's decoder layer with learned positional queries
    (``query_embed``) from which an MLP gives each query a 2-D reference point, fixed through
    the layers; the boxes are predicted relative to it."""

    # the official code's inverse sigmoid of the reference points
    inverse_sigmoid_eps = 1e-5

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        common = single_scale_from_config(cfg, "Conditional DETR")
        _refuse_dab_keys(cfg, "Conditional DETR")
        bbox_embed = MLP(d.HIDDEN_DIM, d.HIDDEN_DIM, 4, 3)
        transformer = DABTransformer(
            **transformer_from_config(cfg),
            query_dim=2,
            keep_query_pos=d.KEEP_QUERY_POS,
            modulate_hw_attn=False,
            bbox_embed=None,
            scale_encoder_position=False,
            learned_query_pos=True,
        )
        return {
            **common,
            "transformer": transformer,
            "bbox_embed": bbox_embed,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "query_dim": 2,
            "criterion": build_set_criterion(cfg),
        }

    def _init_anchors(self, num_queries: int, query_dim: int, random_refpoints_xy: bool) -> None:
        """The learned positional queries ``query_embed`` ``(NQ, C)``, N(0, 1) as
        ``nn.Embedding`` initialises them; the reference points are an MLP of them."""
        self.query_embed = nn.Embedding(num_queries, self.transformer.d_model)  # (NQ, C)
        self.refpoint_xy = None

    def anchors(self) -> torch.Tensor:
        """``(NQ, C)`` the learned positional queries, which the decoder takes in place of
        anchors."""
        return self.query_embed.weight
