"""DAB-DETR's decoder: queries are anchor boxes, refined layer by layer.

In each layer the anchor's sine embedding gives the positional query (through
``ref_point_head``) and, scaled by the content and modulated by the anchor's width and
height, the spatial part of the cross-attention query. Each head of the cross-attention
concatenates a content part and a positional part, for the queries and for the keys.

Conditional DETR's decoder (Meng et al., ICCV 2021), which DAB-DETR's grew from, is the same
stack with three switches: 2-D reference points (``query_dim=2``) that are never refined
(``bbox_embed=None``) and not modulated (``modulate_hw_attn=False``), and
``learned_query_pos``: the positional queries are learned embeddings, and ``ref_point_head``
maps them to the reference points instead of mapping the points' embedding to them.

Shapes: B batch, NQ queries, HW memory tokens, C channels, h heads, D anchor dims
(4: cxcywh, 2: cxcy), L layers. Anchors are normalised to [0, 1].
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import MLP, Attention, box_sine_embedding, post_norm_ffn, refine_boxes

__all__ = ["TransformerDecoder", "TransformerDecoderLayer", "modulate_hw"]


def modulate_hw(sine: torch.Tensor, modulation: Optional[torch.Tensor]) -> torch.Tensor:
    """The width/height modulation of the positional attention (paper Sec. 4.3, Eq. 6): scale
    the y half of a (y, x) sine embedding by ``h_ref / h`` and the x half by ``w_ref / w``.

    Args:
        sine: ``(..., C)``: channels ``[0, C/2)`` encode y, ``[C/2, C)`` encode x.
        modulation: ``(..., 2)`` ``(w_ref / w, h_ref / h)``, or None (returns ``sine``).

    Returns:
        ``(..., C)``.
    """
    if modulation is None:
        return sine
    half = sine.shape[-1] // 2
    y, x = sine[..., :half], sine[..., half:]
    return torch.cat([y * modulation[..., 1:2], x * modulation[..., 0:1]], -1)


class TransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, anchor-conditioned cross-attention, FFN."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
        use_query_pos: bool,
    ):
        """
        Args:
            use_query_pos: add the projected positional query to the content query, and the
                key position to the key content, in the cross-attention (the first layer,
                or every layer with ``keep_query_pos``).
        """
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        # self-attention: separate content and position projections of queries and keys
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = Attention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # cross-attention
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if use_query_pos else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = Attention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        # FFN
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = activation()

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        query_sine_embed: torch.Tensor,
        memory_mask: Optional[torch.Tensor],
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: ``(B, NQ, C)`` content queries.
            memory: ``(B, HW, C)`` encoder output.
            pos: ``(B, HW, C)`` image position encoding.
            query_pos: ``(B, NQ, C)`` positional queries (MLP of the anchors' embedding).
            query_sine_embed: ``(B, NQ, C)`` modulated (y, x) sine embedding of the anchors.
            memory_mask: ``(B, 1, 1, HW)`` bool, True at tokens that may be attended.
            self_attn_mask: boolean, broadcastable to ``(B, 1, NQ, NQ)``, True where a query
                may attend another (denoising), or None.

        Returns:
            ``(B, NQ, C)`` updated content queries.
        """
        p = self.dropout if self.training else 0.0
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attn = self.self_attn(q, k, self.sa_v_proj(tgt), self_attn_mask)
        tgt = self.norm1(tgt + F.dropout(attn, p))

        b, nq, c = tgt.shape
        hw = memory.shape[1]
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        # per head, concatenate content and position: (B, N, h, C/h) x 2 -> (B, N, 2C)
        q = torch.cat([q.view(b, nq, self.nhead, -1), q_sine.view(b, nq, self.nhead, -1)], 3)
        k = torch.cat([k.view(b, hw, self.nhead, -1), k_pos.view(b, hw, self.nhead, -1)], 3)
        attn = self.cross_attn(
            q.view(b, nq, 2 * c), k.view(b, hw, 2 * c), self.ca_v_proj(memory), memory_mask
        )
        tgt = self.norm2(tgt + F.dropout(attn, p))

        return post_norm_ffn(tgt, self.linear1, self.linear2, self.activation, self.norm3, p)


class TransformerDecoder(nn.Module):
    """Stack of decoder layers that refines the anchors after each layer."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
        query_dim: int = 4,
        keep_query_pos: bool = False,
        modulate_hw_attn: bool = True,
        bbox_embed: Optional[nn.Module] = None,
        learned_query_pos: bool = False,
    ):
        """
        Args:
            query_dim: D, 4 for anchor boxes, 2 for anchor points.
            keep_query_pos: add the positional query in every layer's cross-attention.
            modulate_hw_attn: scale the x (y) part of the spatial query by w_ref / w
                (h_ref / h); needs ``query_dim == 4``.
            bbox_embed: box head (or ``nn.ModuleList`` of one per layer) whose output,
                added to the inverse sigmoid of the anchors, gives the next layer's anchors;
                None keeps the anchors fixed.
            learned_query_pos: Conditional DETR: ``forward`` takes learned positional queries,
                and ``ref_point_head`` (an MLP to D) maps them to the reference points (before
                the sigmoid); False: ``forward`` takes the anchors, and ``ref_point_head`` maps
                their sine embedding to the positional queries.
        """
        super().__init__()
        if modulate_hw_attn and query_dim != 4:
            raise ValueError("modulate_hw_attn needs 4D anchor boxes (query_dim=4)")
        if learned_query_pos and bbox_embed is not None:
            raise ValueError("learned_query_pos: the positional queries are learned, so the "
                             "reference points cannot be refined (bbox_embed must be None)")
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(
                d_model, nhead, dim_feedforward, dropout, activation, i == 0 or keep_query_pos
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self.query_dim = query_dim
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.learned_query_pos = learned_query_pos
        if learned_query_pos:
            self.ref_point_head = MLP(d_model, d_model, query_dim, 2)
        else:
            self.ref_point_head = MLP(query_dim // 2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.bbox_embed = bbox_embed

    def _box_head(self, layer_id: int) -> nn.Module:
        if isinstance(self.bbox_embed, nn.ModuleList):
            return self.bbox_embed[layer_id]
        return self.bbox_embed

    def spatial_query_parts(
        self, sine_embed: torch.Tensor, tgt: torch.Tensor, anchors: torch.Tensor, layer_id: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The two factors of a layer's spatial query (paper Sec. 4.2 and 4.3).

        Args:
            sine_embed: ``(..., D * C / 2)`` sine embedding of the anchors (y, x first).
            tgt: ``(..., C)`` content queries entering the layer.
            anchors: ``(..., D)`` the anchors the layer uses.
            layer_id: the layer; the first uses the embedding without ``query_scale``.

        Returns:
            sine: ``(..., C)`` the (y, x) embedding times ``query_scale(tgt)`` after layer 0.
            modulation: ``(..., 2)`` ``(w_ref / w, h_ref / h)``, or None without
                ``modulate_hw_attn``. The layer's query is ``modulate_hw(sine, modulation)``.
        """
        sine = sine_embed[..., : self.d_model]
        if layer_id > 0:  # the first layer uses the embedding as it is
            sine = sine * self.query_scale(tgt)
        if self.ref_anchor_head is None:
            return sine, None
        ref_wh = self.ref_anchor_head(tgt).sigmoid()  # (..., 2): (w_ref, h_ref)
        return sine, ref_wh / anchors[..., 2:4]

    def spatial_query(
        self, sine_embed: torch.Tensor, tgt: torch.Tensor, anchors: torch.Tensor, layer_id: int
    ) -> torch.Tensor:
        """``(..., C)`` the modulated spatial query of a layer: arguments as for
        :meth:`spatial_query_parts`."""
        return modulate_hw(*self.spatial_query_parts(sine_embed, tgt, anchors, layer_id))

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        queries: torch.Tensor,
        memory_mask: Optional[torch.Tensor],
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt: ``(B, NQ, C)`` initial content queries.
            memory: ``(B, HW, C)`` encoder output.
            pos: ``(B, HW, C)`` image position encoding.
            queries: ``(B, NQ, D)`` anchors before the sigmoid; with ``learned_query_pos``
                ``(B, NQ, C)`` the learned positional queries.
            memory_mask: ``(B, 1, 1, HW)`` bool, True at tokens that may be attended.
            self_attn_mask: see ``TransformerDecoderLayer``.

        Returns:
            hs: ``(L, B, NQ, C)`` layer-normed outputs of every layer.
            references: ``(L, B, NQ, D)`` the anchors each layer's output refines (the
                anchors fed to that layer, not detached); ``(1, B, NQ, D)`` without updates.
        """
        if self.learned_query_pos:
            query_pos, anchors = queries, self.ref_point_head(queries).sigmoid()
        else:
            anchors = queries.sigmoid()
        references = [anchors]
        intermediate = []
        sine_embed = None
        for layer_id, layer in enumerate(self.layers):
            if sine_embed is None or self.bbox_embed is not None:
                sine_embed = box_sine_embedding(anchors, self.d_model // 2)
                if not self.learned_query_pos:
                    query_pos = self.ref_point_head(sine_embed)
            spatial = self.spatial_query(sine_embed, tgt, anchors, layer_id)
            tgt = layer(tgt, memory, pos, query_pos, spatial, memory_mask, self_attn_mask)
            # no layer uses anchors refined after the last one
            if self.bbox_embed is not None and layer_id < len(self.layers) - 1:
                delta = self._box_head(layer_id)(tgt)  # refined from the un-normed output
                new_anchors = refine_boxes(anchors, delta[..., : self.query_dim])
                references.append(new_anchors)
                # gradients reach a layer's anchors only through that layer's predictions
                anchors = new_anchors.detach()
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate), torch.stack(references)
