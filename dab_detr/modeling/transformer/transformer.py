"""DAB-DETR's transformer: the encoder of ``encoder.py`` over the image tokens, then the
anchor-box decoder of ``decoder.py`` over the queries (anchors, with their content patterns).
With ``scale_encoder_position=False`` and the decoder's Conditional DETR switches
(``learned_query_pos``, 2-D points, no refinement or modulation) it is Conditional DETR's.

Shapes: B batch, C channels (d_model), H x W feature map, HW = H * W tokens, Q anchors,
P patterns, NQ = Q * max(P, 1) decoder queries, D anchor dims (4: cxcywh, 2: cxcy),
L decoder layers. Anchors and boxes are normalised to [0, 1].
"""

from typing import Optional, Tuple, Type

import torch
from torch import nn

from ...layers import copy_first_parameters
from .decoder import TransformerDecoder
from .encoder import TransformerEncoder

__all__ = ["DABTransformer"]


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
        scale_encoder_position: bool = True,
        learned_query_pos: bool = False,
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
            scale_encoder_position: see ``TransformerEncoder`` (False: DETR's encoder).
            learned_query_pos: see ``TransformerDecoder`` (Conditional DETR).
        """
        super().__init__()
        self.encoder = TransformerEncoder(
            d_model, nhead, num_encoder_layers, dim_feedforward, dropout, activation,
            scale_position=scale_encoder_position,
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
            learned_query_pos=learned_query_pos,
        )
        self.d_model = d_model
        self.num_patterns = num_patterns
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As the reference: the layers of each stack start as copies of the first (its
        # ``_get_clones``), then Xavier redraws every weight matrix of the encoder and decoder,
        # so only the biases stay equal across layers. The patterns keep nn.Embedding's
        # N(0, 1) (the reference makes them after this), and the box head, owned by the
        # detector, its own (zero-last-layer) initialisation.
        copy_first_parameters(self.encoder.layers)
        copy_first_parameters(self.decoder.layers)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith(("patterns.", "decoder.bbox_embed.")):
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        anchors: torch.Tensor,
        pos: torch.Tensor,
        content: Optional[torch.Tensor] = None,
        denoising: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            src: ``(B, C, H, W)`` projected backbone features.
            mask: ``(B, H, W)`` bool, True at padded positions.
            anchors: ``(Q, D)`` anchors before the sigmoid (the learned embedding); with
                ``learned_query_pos``, ``(Q, C)`` the learned positional queries.
            pos: ``(B, C, H, W)`` image position encoding.
            content: ``(C,)`` the content every query starts from before its pattern is added
                (DN-DAB-DETR: the "no object" label embedding and indicator 0); None: zero.
            denoising: ``(content (B, PAD, C), anchors (B, PAD, D) before the sigmoid)`` of
                denoising queries, put before the NQ matching queries; None: none.
            self_attn_mask: ``(B, 1, PAD + NQ, PAD + NQ)`` bool, True where a query may attend
                another in the decoder's self-attention; None: all may.

        Returns:
            hs: ``(L, B, PAD + NQ, C)`` layer-normed output of each decoder layer.
            references: ``(L, B, PAD + NQ, D)`` anchors (after sigmoid) that each layer's
                predictions refine; ``(1, B, PAD + NQ, D)`` when the anchors are not updated.
        """
        b = src.shape[0]
        memory, pos, attn_mask = self.encoder.forward_map(src, mask, pos)

        num_anchors = anchors.shape[0]
        tgt = memory.new_zeros(self.d_model) if content is None else content
        if self.patterns is None:
            tgt = tgt.expand(b, num_anchors, -1)
            refpoints = anchors.unsqueeze(0).expand(b, -1, -1)
        else:
            # query p * Q + q pairs pattern p with anchor q: (P, Q, C) -> (B, P * Q, C)
            patterns = self.patterns.weight[:, None, :].expand(-1, num_anchors, -1).flatten(0, 1)
            tgt = (tgt + patterns).unsqueeze(0).expand(b, -1, -1)
            refpoints = anchors.repeat(self.num_patterns, 1).unsqueeze(0).expand(b, -1, -1)
        if denoising is not None:
            tgt = torch.cat([denoising[0], tgt], 1)
            refpoints = torch.cat([denoising[1], refpoints], 1)
        return self.decoder(tgt, memory, pos, refpoints, attn_mask, self_attn_mask)
