"""DETR's transformer (Carion et al., ECCV 2020): the encoder of ``encoder.py`` without the
position scaling, then a decoder whose queries are learned positions added to the queries and
keys of both attentions in every layer. There are no reference points: the boxes are an MLP of
each layer's output.

Shapes: B batch, C channels (d_model), H x W feature map, HW = H * W tokens, NQ queries,
L decoder layers.
"""

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import EncoderSelfAttention, PackedAttention, copy_first_parameters, post_norm_ffn
from .encoder import TransformerEncoder

__all__ = ["DETRDecoder", "DETRDecoderLayer", "DETRTransformer"]


class DETRDecoderLayer(nn.Module):
    """Post-norm layer: self-attention over the queries, cross-attention to the memory, FFN;
    the attentions are ``nn.MultiheadAttention``'s computation, in-projections packed, and add
    their inputs' content and position (DAB-DETR's concatenate them per head)."""

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
        self.multihead_attn = PackedAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = activation()
        self.dropout = dropout

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            tgt: ``(B, NQ, C)`` content queries.
            memory: ``(B, HW, C)`` encoder output.
            pos: ``(B, HW, C)`` image position encoding.
            query_pos: ``(B, NQ, C)`` the learned query positions.
            memory_mask: ``(B, 1, 1, HW)`` bool, True at tokens that may be attended.

        Returns:
            ``(B, NQ, C)`` updated content queries.
        """
        p = self.dropout if self.training else 0.0
        tgt = self.norm1(tgt + F.dropout(self.self_attn(tgt, query_pos), p))
        attn = self.multihead_attn(tgt + query_pos, memory + pos, memory, memory_mask)
        tgt = self.norm2(tgt + F.dropout(attn, p))
        return post_norm_ffn(tgt, self.linear1, self.linear2, self.activation, self.norm3, p)


class DETRDecoder(nn.Module):
    """Stack of decoder layers; returns every layer's output through the shared final norm."""

    def __init__(self, layers: nn.ModuleList, d_model: int):
        super().__init__()
        self.layers = layers
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Arguments as for :class:`DETRDecoderLayer`. Returns ``(L, B, NQ, C)``: each layer's
        output, layer-normed."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class DETRTransformer(nn.Module):
    """DETR's encoder over the image tokens, then its decoder over the learned queries."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Type[nn.Module] = nn.ReLU,
    ):
        """Defaults: DETR's ``main.py``, which its released models use."""
        super().__init__()
        self.encoder = TransformerEncoder(
            d_model, nhead, num_encoder_layers, dim_feedforward, dropout, activation,
            scale_position=False,
        )
        self.decoder = DETRDecoder(
            nn.ModuleList(
                DETRDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
                for _ in range(num_decoder_layers)
            ),
            d_model,
        )
        self.d_model = d_model
        # as DETR: layers made as copies of the first, then Xavier on every weight matrix
        copy_first_parameters(self.encoder.layers)
        copy_first_parameters(self.decoder.layers)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor, query_pos: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            src: ``(B, C, H, W)`` projected backbone features.
            mask: ``(B, H, W)`` bool, True at padded positions.
            query_pos: ``(NQ, C)`` the learned query positions.
            pos: ``(B, C, H, W)`` image position encoding.

        Returns:
            ``(L, B, NQ, C)`` layer-normed output of each decoder layer.
        """
        memory, pos, attn_mask = self.encoder.forward_map(src, mask, pos)
        query_pos = query_pos.unsqueeze(0).expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)  # the content starts at zero
        return self.decoder(tgt, memory, pos, query_pos, attn_mask)
