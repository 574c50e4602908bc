"""The DINO meta-architecture (Zhang et al., ICLR 2023, "DETR with Improved DeNoising Anchor
Boxes"; IDEA-Research/DINO ``config/DINO/DINO_4scale.py`` and ``DINO_5scale.py``): the
two-stage DAB-Deformable-DETR (``modeling/deformable_transformer``) with

- mixed query selection: the top-``NUM_QUERIES`` encoder proposals, ranked by their best
  class, are the anchors; the content queries are learned and static
  (``EncoderProposals(query="dino")``);
- look forward twice (``DABDeformableDecoder(look_forward_twice=True)``);
- contrastive denoising (``make_contrastive_denoising_queries``);
- one box head and one class head shared by the decoder layers (detrex's DINO: one per
  layer, ``DINO.SHARED_HEADS False``), a final decoder norm, and encoder heads of their own,
  whose selected proposals are supervised as ``_interm``.

Shapes: B batch, C channels, L levels, NQ queries, K classes, N decoder layers. Boxes inside the
model are cxcywh normalised by the size of the (unpadded) input image.
"""

import copy
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ...layers import MLP, PositionEmbeddingSine
from ..criterion import SetCriterion
from ..deformable_transformer import DABDeformableTransformer
from ..denoising import DenoisingQueries, make_contrastive_denoising_queries
from .base import (
    MultiScaleDetector,
    build_set_criterion,
    check_multi_scale_config,
    init_heads,
    transformer_from_config,
)

__all__ = ["DINO"]


@META_ARCH_REGISTRY.register()
class DINO(MultiScaleDetector):
    """DINO: DAB-Deformable-DETR's anchors, DN-DETR's denoising made contrastive, mixed query
    selection and look-forward-twice box refinement."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: List[str],
        position_embedding: PositionEmbeddingSine,
        transformer: DABDeformableTransformer,
        class_embed: nn.Module,
        bbox_embed: nn.Module,
        denoising: Optional[Dict[str, Any]] = None,
        criterion: SetCriterion,
        aux_loss: bool = True,
        num_select: int = 300,
        pixel_mean: List[float],
        pixel_std: List[float],
    ):
        """
        Args:
            backbone, in_features, position_embedding, transformer: see
                ``MultiScaleDetector``; the transformer is two-stage with ``query="dino"``
                proposals (which own the encoder heads) and DINO's decoder, whose box head is
                ``bbox_embed``.
            class_embed, bbox_embed: the decoder's class head ``(..., C) -> (..., K)`` and box
                head ``(..., C) -> (..., 4)``, one each for all layers (the official model), or
                an ``nn.ModuleList`` of one per layer (detrex's).
            denoising: contrastive denoising in training (``dn_number``, ``label_noise``,
                ``box_noise`` of ``make_contrastive_denoising_queries``), with a label
                embedding ``label_enc`` of K + 1 rows of width C; None: none.
            others: see ``SetPredictionDetector``.
        """
        super().__init__(backbone=backbone, in_features=in_features,
                         position_embedding=position_embedding, transformer=transformer,
                         criterion=criterion, aux_loss=aux_loss, num_select=num_select,
                         pixel_mean=pixel_mean, pixel_std=pixel_std)
        if transformer.proposals is None or transformer.proposals.query != "dino":
            raise ValueError("DINO needs a two-stage transformer with query='dino' proposals")
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        first = class_embed[0] if isinstance(class_embed, nn.ModuleList) else class_embed
        self.num_classes = first.out_features
        self.denoising = denoising
        if denoising is not None:
            self.label_enc = nn.Embedding(self.num_classes + 1, transformer.d_model)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        in_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
        _check_config(cfg)
        class_embed = nn.Linear(d.HIDDEN_DIM, d.NUM_CLASSES)
        bbox_embed = MLP(d.HIDDEN_DIM, d.HIDDEN_DIM, 4, 3)
        init_heads([class_embed], [bbox_embed])
        # the encoder heads start as copies of the decoder's, as in the official model
        enc_heads = (copy.deepcopy(class_embed), copy.deepcopy(bbox_embed))
        if not d.DINO.SHARED_HEADS:  # detrex: each layer's heads start as copies
            class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(d.DEC_LAYERS))
            bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(d.DEC_LAYERS))
        transformer = DABDeformableTransformer(
            bbox_embed,
            **transformer_from_config(cfg),
            num_feature_levels=d.DEFORMABLE.NUM_FEATURE_LEVELS,
            enc_n_points=d.DEFORMABLE.ENC_N_POINTS,
            dec_n_points=d.DEFORMABLE.DEC_N_POINTS,
            deformable_attention=d.DEFORMABLE_ATTENTION,
            two_stage_num_proposals=d.NUM_QUERIES,
            two_stage_query="dino",
            enc_heads=enc_heads,
            dino_decoder=True,
            look_forward_twice=d.DINO.LOOK_FORWARD_TWICE,
        )
        denoising = None
        if d.DN.ENABLED:
            # DINO redraws a label with probability dn_label_noise_ratio * 0.5
            denoising = {"dn_number": d.DINO.DN_NUMBER, "label_noise": d.DN.LABEL_NOISE * 0.5,
                         "box_noise": d.DN.BOX_NOISE}
        return {
            "backbone": backbone,
            "in_features": in_features,
            # DINO's encoding: pixel k (from 1) at k / n, temperature 20 in its configs
            "position_embedding": PositionEmbeddingSine(
                d.HIDDEN_DIM // 2, d.PE_TEMPERATURE_H, d.PE_TEMPERATURE_W,
                offset=d.DINO.PE_OFFSET,
            ),
            "transformer": transformer,
            "class_embed": class_embed,
            "bbox_embed": bbox_embed,
            "denoising": denoising,
            "criterion": build_set_criterion(cfg, ["interm"]),
            "aux_loss": d.AUX_LOSS,
            "num_select": d.NUM_SELECT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def make_denoising(
        self, targets: Optional[List[Dict]], num_matching: int
    ) -> Optional[DenoisingQueries]:
        """The contrastive denoising queries of a training batch; None at inference."""
        if self.denoising is None or not self.training or targets is None:
            return None
        return make_contrastive_denoising_queries(
            targets, self.label_enc, num_classes=self.num_classes, num_matching=num_matching,
            **self.denoising)

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True, targets: Optional[List[Dict]] = None
    ) -> Dict[str, Any]:
        """Raw predictions: see ``SetPredictionDetector.forward_predictions``. With
        ``with_aux``, also ``interm_outputs``: the selected proposals' ``pred_logits``
        ``(B, NQ, K)`` and ``pred_boxes`` ``(B, NQ, 4)`` (the decoder's first anchors)."""
        srcs, masks, pos = self.multi_scale_inputs(images)
        # as many matching queries as proposals are selected: NQ, or every token of a small
        # image
        num_matching = min(self.transformer.proposals.num_proposals,
                           sum(src.shape[-2] * src.shape[-1] for src in srcs))
        dn = self.make_denoising(targets, num_matching)
        prefix = mask = None
        if dn is not None:
            # the denoising queries first: (B, PAD, C) and (B, PAD, 4)
            prefix, mask = (dn.content, dn.anchors.sigmoid()), dn.attn_mask
        out = self.transformer(srcs, masks, pos, self_attn_mask=mask, prefix=prefix)
        hs, boxes = out["hs"], out["boxes"]  # (N, B, T, C), (N, B, T, 4)
        num_layers = hs.shape[0]
        layers = list(range(num_layers)) if with_aux else [num_layers - 1]
        if isinstance(self.class_embed, nn.ModuleList):
            logits = torch.stack([self.class_embed[i](hs[i]) for i in layers])
        else:
            logits = self.class_embed(hs[layers])
        if self.denoising is not None and self.training:
            # label_enc's zero term keeps it in the graph (DDP needs every parameter used)
            # when a batch has no object to make denoising queries of
            logits = logits + self.label_enc.weight[0, 0] * 0
        outputs = self.predictions(logits, boxes[layers], with_aux, dn)
        if with_aux:
            outputs["interm_outputs"] = {"pred_logits": out["enc_logits"],
                                         "pred_boxes": out["enc_boxes"]}
        return outputs


def _check_config(cfg) -> None:
    """Refuse settings DINO does not have, naming the keys."""
    d = cfg.MODEL.DAB_DETR
    check_multi_scale_config(cfg, "DINO")
    wrong = []
    if not d.DEFORMABLE.TWO_STAGE or d.DEFORMABLE.TWO_STAGE_QUERY != "dino":
        wrong.append(f"MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE={d.DEFORMABLE.TWO_STAGE} / "
                     f"TWO_STAGE_QUERY={d.DEFORMABLE.TWO_STAGE_QUERY!r} (needs True / \"dino\": "
                     "the encoder proposes the anchors)")
    if d.ENC_LAYERS == 0:
        wrong.append("MODEL.DAB_DETR.ENC_LAYERS=0 (needs >= 1: the encoder proposes the "
                     "anchors)")
    if not d.AUX_LOSS:
        wrong.append("MODEL.DAB_DETR.AUX_LOSS=False (the shared heads and look-forward-twice "
                     "train through every layer's loss)")
    if d.NUM_PATTERNS or d.RANDOM_REFPOINTS_XY or d.KEEP_QUERY_POS:
        wrong.append("MODEL.DAB_DETR.NUM_PATTERNS / RANDOM_REFPOINTS_XY / KEEP_QUERY_POS (the "
                     "encoder gives the anchors)")
    if d.QUERY_DIM != 4 or not d.ITER_UPDATE:
        wrong.append(f"MODEL.DAB_DETR.QUERY_DIM={d.QUERY_DIM} / ITER_UPDATE={d.ITER_UPDATE} "
                     "(needs 4 / True)")
    if d.DN.ENABLED and (d.DINO.DN_NUMBER < 1 or not 0 <= d.DN.LABEL_NOISE <= 1
                         or d.DN.BOX_NOISE < 0):
        wrong.append(f"MODEL.DAB_DETR.DINO.DN_NUMBER={d.DINO.DN_NUMBER} (needs >= 1), "
                     f"DN.LABEL_NOISE={d.DN.LABEL_NOISE} (needs [0, 1]), "
                     f"DN.BOX_NOISE={d.DN.BOX_NOISE} (needs >= 0)")
    if wrong:
        raise ValueError("DINO does not support " + "; ".join(wrong))
