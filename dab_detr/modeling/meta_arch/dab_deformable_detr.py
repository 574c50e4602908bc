"""The DAB-Deformable-DETR meta-architecture: Detectron2 inputs and outputs (``base.py``) around
the plain-PyTorch deformable transformer (``modeling/deformable_transformer``), matcher and
criterion. The model of IDEA-Research/DAB-DETR's ``main.py -m dab_deformable_detr``: multi-scale
deformable attention over 4 levels, anchor boxes refined layer by layer by per-layer heads, and
optionally two stages (the encoder proposes the anchors).

Shapes: B batch, C channels, L levels, Q anchors, NQ decoder queries, K classes, N decoder
layers. Boxes inside the model are cxcywh normalised by the size of the (unpadded) input image.
"""

from typing import Any, Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ...layers import MLP, PositionEmbeddingSine, copy_first_parameters
from ..criterion import SetCriterion
from ..deformable_transformer import TWO_STAGE_QUERIES, DABDeformableTransformer
from .base import (
    MultiScaleDetector,
    build_set_criterion,
    check_multi_scale_config,
    denoising_from_config,
    init_heads,
    transformer_from_config,
)

__all__ = ["DABDeformableDETR"]


@META_ARCH_REGISTRY.register()
class DABDeformableDETR(MultiScaleDetector):
    """DAB-Deformable-DETR (Liu et al., ICLR 2022, Appendix C): DAB-DETR's dynamic anchor boxes
    as the queries of Deformable DETR (Zhu et al., ICLR 2021) with box refinement."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: List[str],
        position_embedding: PositionEmbeddingSine,
        transformer: DABDeformableTransformer,
        class_embed: nn.ModuleList,
        bbox_embed: nn.ModuleList,
        num_queries: int,
        num_patterns: int = 0,
        random_refpoints_xy: bool = False,
        denoising: Optional[Dict[str, Any]] = None,
        criterion: SetCriterion,
        aux_loss: bool = True,
        num_select: int = 100,
        pixel_mean: List[float],
        pixel_std: List[float],
    ):
        """
        Args:
            backbone: a Detectron2 backbone; its ``in_features`` outputs are the first levels.
            position_embedding: sine encoding of each level's positions.
            transformer: the deformable transformer; its decoder refines the anchors with
                ``bbox_embed`` and, with two stages, its encoder proposes them, scored and
                refined by the last of ``class_embed`` and ``bbox_embed``.
            class_embed, bbox_embed: one class and one box head per decoder layer (and one more
                each for the encoder's proposals with two stages).
            num_queries: Q anchors (with two stages, Q proposals).
            num_patterns: learned content patterns P, each added to every content query
                (NQ = Q * max(P, 1)); 0: none.
            random_refpoints_xy: anchor centres drawn uniformly in [0, 1] and never trained.
            denoising: DN-DAB-Deformable-DETR (``num_groups``, ``label_noise``,
                ``box_noise``): the learned content queries are C - 1 wide plus the indicator
                0, and training adds denoising queries; None: DAB-Deformable-DETR.
            others: see ``SetPredictionDetector``.
        """
        super().__init__(backbone=backbone, in_features=in_features,
                         position_embedding=position_embedding, transformer=transformer,
                         criterion=criterion, aux_loss=aux_loss, num_select=num_select,
                         pixel_mean=pixel_mean, pixel_std=pixel_std)
        hidden_dim = transformer.d_model
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.two_stage = transformer.proposals is not None
        self.num_patterns = num_patterns
        self._init_denoising(denoising, class_embed[0].out_features, hidden_dim)
        if not self.two_stage:
            # with denoising, the last channel is the indicator bit (0 for these queries)
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim - int(denoising is not None))
            self._init_anchors(num_queries, 4, random_refpoints_xy)
            if num_patterns > 0:
                self.patterns_embed = nn.Embedding(num_patterns, hidden_dim)
        init_heads(list(class_embed), list(bbox_embed))
        # as the official model (Deformable DETR's _get_clones of one initialised head): every
        # layer's heads start as copies of the first's
        copy_first_parameters(class_embed)
        copy_first_parameters(bbox_embed)
        if not self.two_stage:
            # as the official model (Deformable DETR's box refinement): the first layer's boxes
            # start smaller than the anchors, sigmoid(inverse_sigmoid(wh) - 2)
            nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], -2.0)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DAB_DETR
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        in_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
        _check_config(cfg)
        two_stage = d.DEFORMABLE.TWO_STAGE
        num_heads = d.DEC_LAYERS + int(two_stage)  # two-stage: one more for the proposals
        class_embed = nn.ModuleList(nn.Linear(d.HIDDEN_DIM, d.NUM_CLASSES)
                                    for _ in range(num_heads))
        bbox_embed = nn.ModuleList(MLP(d.HIDDEN_DIM, d.HIDDEN_DIM, 4, 3)
                                   for _ in range(num_heads))
        transformer = DABDeformableTransformer(
            bbox_embed,
            **transformer_from_config(cfg),
            num_feature_levels=d.DEFORMABLE.NUM_FEATURE_LEVELS,
            enc_n_points=d.DEFORMABLE.ENC_N_POINTS,
            dec_n_points=d.DEFORMABLE.DEC_N_POINTS,
            deformable_attention=d.DEFORMABLE_ATTENTION,
            two_stage_num_proposals=d.NUM_QUERIES if two_stage else 0,
            two_stage_query=d.DEFORMABLE.TWO_STAGE_QUERY,
        )
        return {
            "backbone": backbone,
            "in_features": in_features,
            # Deformable DETR's encoding: pixel centres, (k - 0.5) / n
            "position_embedding": PositionEmbeddingSine(
                d.HIDDEN_DIM // 2, d.PE_TEMPERATURE_H, d.PE_TEMPERATURE_W, offset=-0.5
            ),
            "transformer": transformer,
            "class_embed": class_embed,
            "bbox_embed": bbox_embed,
            "num_queries": d.NUM_QUERIES,
            "num_patterns": d.NUM_PATTERNS,
            "random_refpoints_xy": d.RANDOM_REFPOINTS_XY,
            "denoising": denoising_from_config(cfg),
            "criterion": build_set_criterion(cfg, ["enc"] if two_stage else []),
            "aux_loss": d.AUX_LOSS,
            "num_select": d.NUM_SELECT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def queries(self, batch_size: int):
        """``(B, NQ, C)`` content queries and ``(B, NQ, 4)`` anchors in [0, 1]; query
        ``p * Q + q`` pairs pattern p with anchor q."""
        tgt = self.tgt_embed.weight  # (Q, C), or (Q, C - 1) with denoising
        if self.denoising is not None:
            # the indicator 0; label_enc's zero term keeps it in the graph (DDP needs every
            # parameter used) when a batch has no object to make denoising queries of
            indicator = self.label_enc.weight[:1, :1] * 0
            tgt = torch.cat([tgt, indicator.expand(len(tgt), 1)], 1)
        anchors = self.anchors().sigmoid()  # (Q, 4)
        if self.num_patterns > 0:
            patterns = self.patterns_embed.weight  # (P, C)
            # (P, 1, C) + (1, Q, C) -> (P * Q, C)
            tgt = (patterns[:, None] + tgt[None]).flatten(0, 1)
            anchors = anchors.repeat(self.num_patterns, 1)
        return (tgt.unsqueeze(0).expand(batch_size, -1, -1),
                anchors.unsqueeze(0).expand(batch_size, -1, -1))

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True, targets: Optional[List[Dict]] = None
    ) -> Dict[str, Any]:
        """Raw predictions: see ``SetPredictionDetector.forward_predictions``. With two stages
        and ``with_aux``, also ``enc_outputs``: the encoder proposals' ``pred_logits``
        ``(B, S, K)`` and ``pred_boxes`` ``(B, S, 4)``."""
        srcs, masks, pos = self.multi_scale_inputs(images)
        dn = None
        if self.two_stage:
            out = self.transformer(srcs, masks, pos,
                                   enc_heads=[self.class_embed[-1], self.bbox_embed[-1]])
        else:
            tgt, anchors = self.queries(images.tensor.shape[0])
            dn = self.make_denoising(targets, anchors.shape[1])
            mask = None
            if dn is not None:
                # the denoising queries first: (B, PAD + NQ, C) and (B, PAD + NQ, 4)
                tgt = torch.cat([dn.content, tgt], 1)
                anchors = torch.cat([dn.anchors.sigmoid(), anchors], 1)
                mask = dn.attn_mask
            out = self.transformer(srcs, masks, pos, tgt, anchors, self_attn_mask=mask)
        hs, boxes = out["hs"], out["boxes"]  # (N, B, T, C), (N, B, T, 4)
        num_layers = hs.shape[0]
        layers = range(num_layers) if with_aux else [num_layers - 1]
        logits = torch.stack([self.class_embed[i](hs[i]) for i in layers])
        outputs = self.predictions(logits, boxes[list(layers)], with_aux, dn)
        if with_aux and self.two_stage:
            outputs["enc_outputs"] = {"pred_logits": out["enc_logits"],
                                      "pred_boxes": out["enc_boxes"]}
        return outputs


def _check_config(cfg) -> None:
    """Refuse settings this model does not have, naming the keys."""
    d = cfg.MODEL.DAB_DETR
    check_multi_scale_config(cfg, "DAB-Deformable-DETR")
    queries = [q for q in TWO_STAGE_QUERIES if q != "dino"]  # DINO's: its own meta-architecture
    if d.DEFORMABLE.TWO_STAGE_QUERY not in queries:
        raise ValueError(f"MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY="
                         f"{d.DEFORMABLE.TWO_STAGE_QUERY!r}; expected one of {queries} "
                         "(\"dino\" is MODEL.META_ARCHITECTURE \"DINO\"'s)")
    unsupported = {
        "MODEL.DAB_DETR.QUERY_DIM": (d.QUERY_DIM, 4),
        "MODEL.DAB_DETR.ITER_UPDATE": (d.ITER_UPDATE, True),
        # without the auxiliary losses the earlier layers' heads would get no gradient
        "MODEL.DAB_DETR.AUX_LOSS": (d.AUX_LOSS, True),
        # DAB-DETR's cross-attention options: deformable attention has no such query
        "MODEL.DAB_DETR.KEEP_QUERY_POS": (d.KEEP_QUERY_POS, False),
    }
    wrong = [f"{k}={v!r} (needs {need!r})" for k, (v, need) in unsupported.items() if v != need]
    if d.DEFORMABLE.TWO_STAGE and (d.RANDOM_REFPOINTS_XY or d.NUM_PATTERNS or d.DN.ENABLED):
        wrong.append("MODEL.DAB_DETR.RANDOM_REFPOINTS_XY / NUM_PATTERNS / DN.ENABLED with "
                     "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE (the encoder gives the anchors)")
    if d.ENC_LAYERS == 0:
        wrong.append("MODEL.DAB_DETR.ENC_LAYERS=0 (needs >= 1: the level embeddings enter the "
                     "positions only the encoder reads)")
    if d.DN.ENABLED and d.NUM_PATTERNS:
        wrong.append("MODEL.DAB_DETR.NUM_PATTERNS with MODEL.DAB_DETR.DN.ENABLED (as in DN-DETR)")
    if wrong:
        raise ValueError("DAB-Deformable-DETR does not support " + "; ".join(wrong))
