"""DAB-DETR's transformer: a DETR encoder whose positions are scaled by the content, and the
anchor-box decoder of ``decoder.py``.

Shapes: B batch, C channels (d_model), H x W feature map, HW = H * W tokens, Q anchors,
P patterns, NQ = Q * max(P, 1) decoder queries, D anchor dims (4: cxcywh, 2: cxcy),
L decoder layers. Anchors and boxes are normalised to [0, 1].
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .attention import EncoderSelfAttention, key_padding_to_attn_mask
from .decoder import TransformerDecoder
from .mlp import MLP

__all__ = ["DABTransformer", "TransformerEncoder", "TransformerEncoderLayer"]


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention with positions on queries and keys, then FFN."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Type[nn.Module],
    ):
        super().__init__()
        self.self_attn = EncoderSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = activation()
        self.dropout = dropout

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, HW, C)``; ``attn_mask``: ``(B, 1, 1, HW)``. Returns
        ``(B, HW, C)``."""
        p = self.dropout if self.training else 0.0
        src = self.norm1(src + F.dropout(self.self_attn(src, pos, attn_mask), p))
        ffn = self.linear2(F.dropout(self.activation(self.linear1(src)), p))
        return self.norm2(src + F.dropout(ffn, p))


class TransformerEncoder(nn.Module):
    """Encoder whose position encoding is scaled, per layer, by an MLP of the current tokens."""

    def __init__(self, layers: nn.ModuleList, d_model: int):
        super().__init__()
        self.layers = layers
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, HW, C)``. Returns the memory, ``(B, HW, C)``."""
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), attn_mask)
        return src


class DABTransformer(nn.Module):
    """Encoder over the image tokens, then the decoder over anchor-box queries."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: Type[nn.Module] = nn.PReLU,
        num_patterns: int = 0,
        query_dim: int = 4,
        keep_query_pos: bool = False,
        modulate_hw_attn: bool = True,
        bbox_embed: Optional[nn.Module] = None,
    ):
        """
        Args:
            d_model, nhead, dim_feedforward, dropout: transformer width, heads, FFN width
                and dropout.
            num_encoder_layers, num_decoder_layers: depths.
            activation: FFN activation class, instantiated once per layer.
            num_patterns: learned content patterns P, each paired with every anchor;
                0 starts every content query at zero.
            query_dim: D, 4 for anchor boxes, 2 for anchor points.
            keep_query_pos, modulate_hw_attn: see ``TransformerDecoder``.
            bbox_embed: the box head that refines the anchors after each decoder layer (an
                ``nn.ModuleList`` of one head per layer), or None to keep the anchors fixed.
        """
        super().__init__()
        self.encoder = TransformerEncoder(
            nn.ModuleList(
                TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
                for _ in range(num_encoder_layers)
            ),
            d_model,
        )
        self.decoder = TransformerDecoder(
            d_model=d_model,
            nhead=nhead,
            num_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            query_dim=query_dim,
            keep_query_pos=keep_query_pos,
            modulate_hw_attn=modulate_hw_attn,
            bbox_embed=bbox_embed,
        )
        self.d_model = d_model
        self.num_patterns = num_patterns
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for every weight matrix of the encoder and decoder, as the reference does;
        # the box head, owned by the detector, keeps its own (zero-last-layer) initialisation.
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith(("patterns.", "decoder.bbox_embed.")):
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        anchors: torch.Tensor,
        pos: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            src: ``(B, C, H, W)`` projected backbone features.
            mask: ``(B, H, W)`` bool, True at padded positions.
            anchors: ``(Q, D)`` anchors before the sigmoid (the learned embedding).
            pos: ``(B, C, H, W)`` image position encoding.

        Returns:
            hs: ``(L, B, NQ, C)`` layer-normed output of each decoder layer.
            references: ``(L, B, NQ, D)`` anchors (after sigmoid) that each layer's
                predictions refine; ``(1, B, NQ, D)`` when the anchors are not updated.
        """
        b = src.shape[0]
        # (B, C, H, W) -> (B, HW, C): tokens in row-major order, contiguous once here (a
        # no-op for channels-last maps) rather than copied by the linear layers that read them
        src = src.flatten(2).transpose(1, 2).contiguous()
        pos = pos.flatten(2).transpose(1, 2).contiguous()
        attn_mask = key_padding_to_attn_mask(mask.flatten(1))
        memory = self.encoder(src, pos, attn_mask)

        num_anchors = anchors.shape[0]
        if self.patterns is None:
            tgt = src.new_zeros(b, num_anchors, self.d_model)
            refpoints = anchors.unsqueeze(0).expand(b, -1, -1)
        else:
            # query p * Q + q pairs pattern p with anchor q: (P, Q, C) -> (B, P * Q, C)
            tgt = self.patterns.weight[:, None, :].expand(-1, num_anchors, -1).flatten(0, 1)
            tgt = tgt.unsqueeze(0).expand(b, -1, -1)
            refpoints = anchors.repeat(self.num_patterns, 1).unsqueeze(0).expand(b, -1, -1)
        return self.decoder(tgt, memory, pos, refpoints, attn_mask)
