"""Two-stage DAB-Deformable-DETR: the encoder proposes the decoder's anchors.

Every encoder token gets a proposal box (Deformable DETR, Zhu et al., ICLR 2021, Sec. 4.2 and
``gen_encoder_output_proposals``): centred on the token, of side ``0.05 * 2^l`` on level l;
the encoder's class head scores it (class-agnostic in training) and its box head refines it.
The top-k become the decoder's anchors (detached). Their content queries come in two ways
(``query``):

- ``"official"`` (Deformable DETR, DAB-DETR's code): the proposals rank by their first class,
  and each content query is the projected sine embedding of its proposal (``pos_trans``);
- ``"encoder_content"`` (detrex's two-stage DAB-Deformable-DETR, as DINO's query selection):
  the proposals rank by their best class, and each content query is its token's
  ``enc_output_norm(enc_output(memory))`` row, detached. No ``pos_trans``.
- ``"dino"`` (DINO's mixed query selection, Zhang et al., ICLR 2023, Sec. 3.4): ranked by
  their best class as well, but the content queries are learned and static (``tgt_embed``,
  one per query); the encoder heads are this module's own (``enc_out_class_embed``,
  ``enc_out_bbox_embed``), and the losses supervise the selected proposals only.

Padding and border tokens (whose proposal is ``inf``) rank last in the first two ways, so that
an image's anchors do not depend on what it is batched with. DINO ranks them by their score, as
its official code does: their memory is zeroed before ``enc_output``, so they all score alike
(``enc_output_norm(enc_output.bias)``'s logits) and, when chosen, get the anchor
sigmoid(inf) = 1.

Shapes: B batch, S tokens over L levels, C channels, K proposals kept.
"""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ...layers import SpatialShapes, level_shapes, sine_features

__all__ = ["EncoderProposals", "TWO_STAGE_QUERIES", "encoder_output_proposals"]

# the ways of making the content queries of the selected proposals (see the module docstring)
TWO_STAGE_QUERIES = ("official", "encoder_content", "dino")


def encoder_output_proposals(
    memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: SpatialShapes
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One proposal per token, in inverse-sigmoid space.

    Args:
        memory: ``(B, S, C)`` encoder output.
        padding_mask: ``(B, S)`` bool, True at padding.
        spatial_shapes: ``(H_l, W_l)`` per level (``SpatialShapes``).

    Returns:
        memory: ``(B, S, C)`` the memory, zero at padding and at invalid proposals.
        proposals: ``(B, S, 4)`` cxcywh proposals before the sigmoid (centre of the token in
            the image's unpadded extent, side ``0.05 * 2^l``); ``inf`` at padding and where a
            coordinate is within 0.01 of the border, so that they are never selected.
    """
    b = memory.shape[0]
    # in float32 whatever the model's precision, as Deformable DETR and detrex (float32
    # linspace): in float64 this moves the proposals, hence the anchors, by about 1e-7
    dtype = torch.float32
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        mask = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        # 0, 1, ..., n - 1 (linspace's values; torch.export makes its count constant)
        ys = torch.arange(h, dtype=dtype, device=memory.device)
        xs = torch.arange(w, dtype=dtype, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)  # (H_l, W_l, 2) (x, y)
        scale = torch.stack([valid_w, valid_h], -1).to(dtype).view(b, 1, 1, 2)
        centre = (grid[None] + 0.5) / scale  # (B, H_l, W_l, 2)
        size = torch.full_like(centre, 0.05 * 2.0**lvl)
        proposals.append(torch.cat([centre, size], -1).view(b, h * w, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)  # (B, S, 4)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf")).to(memory.dtype)
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


class EncoderProposals(nn.Module):
    """Scores the encoder's proposals and turns the top-k into anchors and content queries."""

    def __init__(
        self,
        d_model: int,
        num_proposals: int,
        query: str = "official",
        class_head: Optional[nn.Module] = None,
        box_head: Optional[nn.Module] = None,
    ):
        """
        Args:
            d_model: C.
            num_proposals: K, the proposals kept.
            query: one of ``TWO_STAGE_QUERIES``: how the proposals are ranked and their
                content queries made (see the module docstring).
            class_head, box_head: ``"dino"``: the encoder heads, owned by this module
                (``enc_out_class_embed``, ``enc_out_bbox_embed``); the other ways take
                the detector's heads in ``forward``.
        """
        super().__init__()
        if query not in TWO_STAGE_QUERIES:
            raise ValueError(f"query={query!r}; expected one of {TWO_STAGE_QUERIES}")
        if (query == "dino") != (class_head is not None and box_head is not None):
            raise ValueError("the encoder heads are given to the module with query='dino' "
                             "only, and then both")
        self.num_proposals = num_proposals
        self.query = query
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        if query == "official":
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        if query == "dino":
            self.enc_out_class_embed = class_head
            self.enc_out_bbox_embed = box_head
            self.tgt_embed = nn.Embedding(num_proposals, d_model)
        self.d_model = d_model

    def forward(
        self,
        memory: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes: SpatialShapes,
        class_head: Optional[nn.Module] = None,
        box_head: Optional[nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            memory, padding_mask, spatial_shapes: as for :func:`encoder_output_proposals`.
            class_head: ``(..., C) -> (..., K_cls)`` scores of the proposals (the first class
                ranks them, as in Deformable DETR, or the best class with
                ``"encoder_content"``; training makes it class-agnostic). None with
                ``"dino"``, whose heads are the module's.
            box_head: ``(..., C) -> (..., 4)`` deltas added to the proposals.

        Returns:
            tgt: ``(B, K, C)`` content queries of the top-k proposals.
            anchors: ``(B, K, 4)`` their refined boxes, cxcywh in [0, 1], detached.
            enc_logits: ``(B, S, K_cls)`` every proposal's scores; ``"dino"``: ``(B, K,
                K_cls)``, the top-k's.
            enc_boxes: ``(B, S, 4)`` every proposal's refined box (after the sigmoid);
                ``"dino"``: ``(B, K, 4)``, the top-k's, not detached.
        """
        if self.query == "dino":
            class_head, box_head = self.enc_out_class_embed, self.enc_out_bbox_embed
        elif class_head is None or box_head is None:
            raise ValueError(f"query={self.query!r} needs the detector's class and box heads")
        output, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes)
        output = self.enc_output_norm(self.enc_output(output))
        enc_logits = class_head(output)
        enc_unact = box_head(output) + proposals  # (B, S, 4), inf at invalid proposals
        k = min(self.num_proposals, enc_logits.shape[1])
        score = enc_logits[..., 0] if self.query == "official" else enc_logits.max(-1).values
        if self.query != "dino":
            # padding and border proposals (inf) last, so that an image's anchors do not
            # depend on what it is batched with (Deformable DETR and detrex rank them by their
            # score, as DINO does)
            score = score.masked_fill(torch.isinf(proposals).any(-1), float("-inf"))
        top = score.topk(k, dim=1).indices  # (B, K)
        top_unact = torch.gather(enc_unact, 1, top.unsqueeze(-1).expand(-1, -1, 4))
        if self.query == "dino":
            tgt = self.tgt_embed.weight[:k].unsqueeze(0).expand(memory.shape[0], -1, -1)
            top_logits = torch.gather(enc_logits, 1,
                                      top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
            return tgt, top_unact.detach().sigmoid(), top_logits, top_unact.sigmoid()
        top_unact = top_unact.detach()
        if self.query == "encoder_content":
            # the selected tokens' rows of the projected memory: (B, K, C)
            tgt = torch.gather(output, 1, top.unsqueeze(-1).expand(-1, -1, self.d_model))
            return tgt.detach(), top_unact.sigmoid(), enc_logits, enc_unact.sigmoid()
        # the sine embedding of the (x, y, w, h) proposal, 128 channels each: (B, K, 4C / 2)
        embed = sine_features(top_unact.sigmoid() * (2 * math.pi), self.d_model // 2, 10000.0)
        embed = self.pos_trans_norm(self.pos_trans(embed.flatten(-2)))
        # the projection's two halves: Deformable DETR's positional query, then the content;
        # DAB's decoder makes its positional query from the anchors, so only the content is used
        tgt = embed[..., self.d_model :]
        return tgt, top_unact.sigmoid(), enc_logits, enc_unact.sigmoid()
