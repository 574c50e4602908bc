"""DAB-Deformable-DETR's decoder: anchor-box queries over multi-scale deformable attention.

Per layer, the anchors (cxcywh, normalised by each image's unpadded size) scaled by each
level's valid ratios are the reference boxes of the deformable cross-attention, which samples
points around the anchor's centre in proportion to its width and height. The positional
query is ``ref_point_head`` of the anchors' sine embedding, multiplied from the second layer
on by ``query_scale`` of the content; it is added to the content for the self-attention's
queries and keys and for the cross-attention's query. After each layer the box head refines
the anchors (``refine_boxes``), detached before the next layer.

DINO's decoder (Zhang et al., ICLR 2023) is the same stack with three switches: no
``query_scale``; a final ``norm`` before the heads, so that a layer's reported boxes are made
from its normed output while the next layer's anchors come from its raw output; and "look
forward twice": a layer's reported boxes refine the previous layer's boxes *before* they are
detached, so that the later layer's loss reaches the earlier layer's box head. Its box head is
one module shared by all layers.

Shapes: B batch, NQ queries, S memory tokens over L levels, C channels, N layers.
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import (
    MLP,
    EncoderSelfAttention,
    MSDeformAttn,
    SpatialShapes,
    box_sine_embedding,
    post_norm_ffn,
    refine_boxes,
)

__all__ = ["DABDeformableDecoder", "DeformableDecoderLayer"]


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, deformable cross-attention, FFN (the names and order
    of Deformable DETR's layer: ``norm2`` after self-attention, ``norm1`` after
    cross-attention). ``deformable_attention``: the implementation of the sampling
    (``MSDeformAttn``'s ``implementation``)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
        n_levels: int,
        n_points: int,
        deformable_attention: str = "auto",
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, deformable_attention)
        self.norm1 = nn.LayerNorm(d_model)
        # q = k = content + position, v = content: nn.MultiheadAttention's packed layout
        self.self_attn = EncoderSelfAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation()
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        memory_padding_mask: Optional[torch.Tensor],
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: ``(B, NQ, C)`` content queries.
            query_pos: ``(B, NQ, C)`` positional queries.
            reference_boxes: ``(B, NQ, L, 4)`` the anchors in each level's padded coordinates.
            memory: ``(B, S, C)`` encoder output.
            spatial_shapes, level_start_index: ``(H_l, W_l)`` per level and ``(L,)``.
            memory_padding_mask: ``(B, S)`` bool, True at padding, or None.
            self_attn_mask: boolean mask broadcastable to ``(B, 1, NQ, NQ)``, True where a
                query may attend another, or None (all may).

        Returns:
            ``(B, NQ, C)``.
        """
        p = self.dropout if self.training else 0.0
        tgt = self.norm2(tgt + F.dropout(self.self_attn(tgt, query_pos, self_attn_mask), p))
        attn = self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes,
                               level_start_index, memory_padding_mask)
        tgt = self.norm1(tgt + F.dropout(attn, p))
        return post_norm_ffn(tgt, self.linear1, self.linear2, self.activation, self.norm3, p)


class DABDeformableDecoder(nn.Module):
    """A stack of :class:`DeformableDecoderLayer` that refines the anchors after every layer."""

    def __init__(
        self,
        layers: nn.ModuleList,
        d_model: int,
        bbox_embed: nn.Module,
        query_scale: bool = True,
        final_norm: bool = False,
        look_forward_twice: bool = False,
    ):
        """
        Args:
            layers: the N decoder layers.
            d_model: C.
            bbox_embed: one box head per layer, an ``nn.ModuleList`` (``(..., C) -> (..., 4)``
                deltas in inverse-sigmoid space), or one head that every layer shares
                (DINO); shared with the detector, which owns them.
            query_scale: scale the positional query by an MLP of the content from the second
                layer on (DAB-Deformable-DETR); DINO has no such scale.
            final_norm: a LayerNorm ``norm`` of every layer's output before the heads (DINO).
            look_forward_twice: every layer's reported boxes refine the previous layer's boxes
                before they are detached (DINO); False: the anchors that layer used.
        """
        super().__init__()
        if isinstance(bbox_embed, nn.ModuleList) and len(bbox_embed) < len(layers):
            raise ValueError(f"{len(layers)} decoder layers need as many box heads, got "
                             f"{len(bbox_embed)}")
        self.layers = layers
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2) if query_scale else None
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed = bbox_embed
        self.norm = nn.LayerNorm(d_model) if final_norm else None
        self.look_forward_twice = look_forward_twice

    def box_head(self, layer_id: int) -> nn.Module:
        """The box head of layer ``layer_id``."""
        if isinstance(self.bbox_embed, nn.ModuleList):
            return self.bbox_embed[layer_id]
        return self.bbox_embed

    def forward(
        self,
        tgt: torch.Tensor,
        anchors: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        ratios: torch.Tensor,
        memory_padding_mask: Optional[torch.Tensor],
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt: ``(B, NQ, C)`` initial content queries.
            anchors: ``(B, NQ, 4)`` initial anchors, cxcywh in [0, 1].
            memory: ``(B, S, C)`` encoder output.
            spatial_shapes, level_start_index: ``(H_l, W_l)`` per level and ``(L,)``.
            ratios: ``(B, L, 2)`` valid ratios ``(w, h)`` of each level.
            memory_padding_mask: ``(B, S)`` bool, True at padding, or None.
            self_attn_mask: see :class:`DeformableDecoderLayer`.

        Returns:
            hs: ``(N, B, NQ, C)`` every layer's output (after ``norm`` with a final norm).
            boxes: ``(N, B, NQ, 4)`` every layer's boxes: its reference refined by its box
                head applied to its ``hs``. The reference is the anchors the layer used
                (gradients reach the anchors of the first layer only; the later layers' are
                detached), or with ``look_forward_twice`` the previous layer's boxes before
                they were detached.
            references: ``(N, B, NQ, 4)`` those references.
        """
        # (B, L, 2) -> (B, 1, L, 4): (w, h, w, h) ratios scale cxcywh anchors to each level
        box_ratios = torch.cat([ratios, ratios], -1)[:, None]
        hs, boxes, references = [], [], []
        reference = anchors  # what this layer's reported boxes refine
        for layer_id, layer in enumerate(self.layers):
            references.append(reference)
            reference_boxes = anchors[:, :, None] * box_ratios  # (B, NQ, L, 4)
            # the positional query embeds the anchor as seen on the first level
            query_pos = self.ref_point_head(
                box_sine_embedding(reference_boxes[:, :, 0], self.d_model // 2)
            )
            if self.query_scale is not None and layer_id > 0:  # the first layer: as it is
                query_pos = query_pos * self.query_scale(tgt)
            tgt = layer(tgt, query_pos, reference_boxes, memory, spatial_shapes,
                        level_start_index, memory_padding_mask, self_attn_mask)
            head = self.box_head(layer_id)
            # the next layer's anchors: the raw output's refinement
            refined = refine_boxes(anchors, head(tgt))
            out = tgt if self.norm is None else self.norm(tgt)
            if self.norm is None and reference is anchors:
                boxes.append(refined)
            else:
                boxes.append(refine_boxes(reference, head(out)))
            hs.append(out)
            # gradients reach a layer's anchors only through that layer's predictions (and,
            # looking forward twice, the next layer's)
            anchors = refined.detach()
            reference = refined if self.look_forward_twice else anchors
        return torch.stack(hs), torch.stack(boxes), torch.stack(references)
