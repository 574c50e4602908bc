"""The DAB-DETR meta-architecture: Detectron2 inputs and outputs (``base.py``) around the
plain-PyTorch transformer, matcher and criterion.

Shapes: B batch, C channels, H x W feature map, Q anchors, NQ decoder queries, K classes,
L decoder layers, D anchor dims. Boxes inside the model are cxcywh normalised by the size
of the (unpadded) input image.
"""

from typing import Any, Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import nn

from ...layers import MLP, PositionEmbeddingSine, refine_boxes
from ..criterion import SetCriterion
from ..transformer import DABTransformer
from .base import (
    SingleScaleDetector,
    build_set_criterion,
    denoising_from_config,
    init_heads,
    single_scale_from_config,
    transformer_from_config,
)

__all__ = ["DABDETR"]


@META_ARCH_REGISTRY.register()
class DABDETR(SingleScaleDetector):
    """DAB-DETR (Liu et al., ICLR 2022): DETR whose queries are dynamic anchor boxes."""

    # the clamp of the inverse sigmoid through which the boxes refine the anchors
    inverse_sigmoid_eps = 1e-3

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
        denoising: Optional[Dict[str, Any]] = None,
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
            denoising: DN-DAB-DETR (``num_groups``, ``label_noise``, ``box_noise``): the
                matching queries start from the "no object" label embedding, and training
                adds denoising queries; None: DAB-DETR.
            criterion: training losses; its ``weight_dict`` weights them.
            aux_loss: also supervise the earlier decoder layers.
            num_select: detections kept per image, top-k over queries x classes.
            pixel_mean, pixel_std: per-channel normalisation, in the input channel order.
        """
        hidden_dim = transformer.d_model
        super().__init__(backbone=backbone, criterion=criterion, aux_loss=aux_loss,
                         num_select=num_select, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         in_feature=in_feature, position_embedding=position_embedding,
                         hidden_dim=hidden_dim)
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self._init_denoising(denoising, num_classes, hidden_dim)
        self.bbox_embed = bbox_embed
        self.query_dim = query_dim
        self._init_anchors(num_queries, query_dim, random_refpoints_xy)
        init_heads([self.class_embed],
                   bbox_embed if isinstance(bbox_embed, nn.ModuleList) else [bbox_embed])

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        common = single_scale_from_config(cfg, "DAB-DETR")
        if d.RANDOM_REFPOINTS_XY and d.QUERY_DIM != 4:
            raise ValueError("MODEL.DAB_DETR.RANDOM_REFPOINTS_XY needs QUERY_DIM = 4")
        if d.DN.ENABLED and d.QUERY_DIM != 4:
            raise ValueError("MODEL.DAB_DETR.DN.ENABLED needs QUERY_DIM = 4 (the noised "
                             "boxes are the denoising queries' anchors)")
        if d.BBOX_EMBED_DIFF_EACH_LAYER and not d.AUX_LOSS and d.DEC_LAYERS > 1:
            raise ValueError(
                "MODEL.DAB_DETR.BBOX_EMBED_DIFF_EACH_LAYER True with MODEL.DAB_DETR.AUX_LOSS "
                "False: only the last layer is supervised, so the box heads of the earlier "
                "layers would never learn (and DDP stops at parameters without gradients). "
                "Set AUX_LOSS True or BBOX_EMBED_DIFF_EACH_LAYER False."
            )
        box_head = lambda: MLP(d.HIDDEN_DIM, d.HIDDEN_DIM, 4, 3)  # noqa: E731
        if d.BBOX_EMBED_DIFF_EACH_LAYER:
            bbox_embed = nn.ModuleList(box_head() for _ in range(d.DEC_LAYERS))
        else:
            bbox_embed = box_head()
        transformer = DABTransformer(
            **transformer_from_config(cfg),
            num_patterns=d.NUM_PATTERNS,
            query_dim=d.QUERY_DIM,
            keep_query_pos=d.KEEP_QUERY_POS,
            modulate_hw_attn=d.MODULATE_HW_ATTN,
            bbox_embed=bbox_embed if d.ITER_UPDATE else None,
        )
        return {
            **common,
            "transformer": transformer,
            "bbox_embed": bbox_embed,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "query_dim": d.QUERY_DIM,
            "random_refpoints_xy": d.RANDOM_REFPOINTS_XY,
            "denoising": denoising_from_config(cfg),
            "criterion": build_set_criterion(cfg),
        }

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True, targets: Optional[List[Dict]] = None
    ) -> Dict[str, Any]:
        """Raw predictions of the last decoder layer, and of the others with ``with_aux``.

        Args:
            images: normalised images, as ``preprocess_image`` batches them.
            with_aux: also predict classes and boxes from the earlier layers' outputs.
                Inference needs only the last layer's; the earlier layers still refine the
                anchors inside the decoder either way.
            targets: training targets (``prepare_targets``), for the denoising queries.

        Returns:
            ``pred_logits`` ``(B, NQ, K)`` and ``pred_boxes`` ``(B, NQ, 4)`` of the last layer,
            with ``with_aux`` ``aux_outputs``, a list of such dicts for the other layers, and
            with denoising in training ``dn_outputs`` (``SetPredictionDetector.predictions``).
        """
        src, mask, pos = self.feature_map(images)
        anchors = self.anchors()
        content, dn, extra = None, None, {}
        if self.denoising is not None:
            # DN-DAB-DETR: every matching query starts from the "no object" embedding, with the
            # indicator 0: (C,)
            no_object = self.label_enc.weight[self.num_classes]
            content = torch.cat([no_object, no_object.new_zeros(1)])
            dn = self.make_denoising(targets, len(anchors) * max(self.transformer.num_patterns, 1))
        if dn is not None:
            extra = {"denoising": (dn.content, dn.anchors), "self_attn_mask": dn.attn_mask}
        hs, references = self.transformer(src, mask, anchors, pos, content=content, **extra)
        if not with_aux:
            # (L, B, NQ, C) -> (1, B, NQ, C): heads only on the last layer
            hs, references = hs[-1:], references[-1:]
        logits = self.class_embed(hs)  # (L|1, B, NQ, K)
        boxes = self._predict_boxes(hs, references)  # (L|1, B, NQ, 4)
        return self.predictions(logits, boxes, with_aux, dn)

    def _predict_boxes(self, hs: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes ``(N, B, NQ, 4)`` refining anchors ``references`` ``(N|1, B, NQ, D)`` from
        the last N layers' outputs ``hs`` ``(N, B, NQ, C)``."""
        if isinstance(self.bbox_embed, nn.ModuleList):
            heads = self.bbox_embed[len(self.bbox_embed) - len(hs) :]  # the last N heads
            delta = torch.stack([head(h) for head, h in zip(heads, hs)])
        else:
            delta = self.bbox_embed(hs)
        return refine_boxes(references, delta, self.inverse_sigmoid_eps)
