"""DAB-Deformable-DETR's transformer: the multi-scale maps flattened into one token sequence,
the deformable encoder over it, and the anchor-box decoder; two-stage, the encoder proposes
the anchors.

Shapes: B batch, L levels of H_l x W_l, S = sum H_l * W_l tokens (level-major, row-major),
C channels, NQ queries, N decoder layers. Boxes are cxcywh normalised by each image's
(unpadded) size.
"""

from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from ...layers import MSDeformAttn, copy_first_parameters
from .decoder import DABDeformableDecoder, DeformableDecoderLayer
from .encoder import DeformableEncoder, DeformableEncoderLayer, valid_ratios
from .two_stage import EncoderProposals

__all__ = ["DABDeformableTransformer"]


class DABDeformableTransformer(nn.Module):
    """Deformable encoder and anchor-box decoder over multi-scale maps."""

    def __init__(
        self,
        bbox_embed: nn.ModuleList,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: Type[nn.Module] = nn.ReLU,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage_num_proposals: int = 0,
        two_stage_query: str = "official",
        enc_heads: Optional[Tuple[nn.Module, nn.Module]] = None,
        dino_decoder: bool = False,
        look_forward_twice: bool = True,
        deformable_attention: str = "auto",
    ):
        """
        Args:
            bbox_embed: one box head per decoder layer (an ``nn.ModuleList``), or one head that
                every layer shares (DINO), owned by the detector and shared with the decoder,
                which refines the anchors with them.
            d_model, nhead, dim_feedforward, dropout: width, heads, FFN width, dropout.
            num_encoder_layers, num_decoder_layers: depths.
            activation: FFN activation class.
            num_feature_levels: L.
            enc_n_points, dec_n_points: sampling points per head and level.
            two_stage_num_proposals: 0 for the one-stage model (the detector gives the
                anchors); K > 0 for the two-stage model (the top-K encoder proposals).
            two_stage_query: how the two-stage model ranks its proposals and makes their
                content queries: ``"official"``, ``"encoder_content"`` (detrex's) or
                ``"dino"`` (see ``EncoderProposals``).
            enc_heads: ``"dino"``: the encoder's (class head, box head), which the proposals
                module owns.
            dino_decoder: DINO's decoder: no query scale, a final norm, and
                ``look_forward_twice`` (see ``DABDeformableDecoder``).
            look_forward_twice: with ``dino_decoder``, whether the reported boxes refine the
                previous layer's boxes before they are detached.
            deformable_attention: which implementation samples in every deformable attention
                (``"auto"``, ``"pytorch"``, ``"light"``, ``"triton"``: see
                ``multi_scale_deformable_attention``); the results are the same.
        """
        super().__init__()
        self.d_model = d_model
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(nn.ModuleList(
            DeformableEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                   num_feature_levels, enc_n_points, deformable_attention)
            for _ in range(num_encoder_layers)
        ))
        self.decoder = DABDeformableDecoder(
            nn.ModuleList(
                DeformableDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                       num_feature_levels, dec_n_points, deformable_attention)
                for _ in range(num_decoder_layers)
            ),
            d_model,
            bbox_embed,
            query_scale=not dino_decoder,
            final_norm=dino_decoder,
            look_forward_twice=dino_decoder and look_forward_twice,
        )
        self.proposals = (
            EncoderProposals(d_model, two_stage_num_proposals, two_stage_query,
                             *(enc_heads or (None, None)))
            if two_stage_num_proposals > 0 else None
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As Deformable DETR: the layers of each stack start as copies of the first (its
        # ``_get_clones``; the biases stay equal across layers), then Xavier for every matrix
        # of the transformer (the box heads, owned by the detector, keep theirs), then the
        # deformable attentions' own initialisation, which zeroes some of those matrices
        # again, and N(0, 1) level embeddings. (DINO's static content queries too get Xavier:
        # its transformer initialises them after drawing them N(0, 1).)
        copy_first_parameters(self.encoder.layers)
        copy_first_parameters(self.decoder.layers)
        heads = ("decoder.bbox_embed.", "proposals.enc_out_")  # initialised by the detector
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith(heads):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        tgt: Optional[torch.Tensor] = None,
        anchors: Optional[torch.Tensor] = None,
        enc_heads: Optional[List[nn.Module]] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
        prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            srcs: L maps ``(B, C, H_l, W_l)``.
            masks: L masks ``(B, H_l, W_l)`` bool, True at padding.
            pos_embeds: L position encodings ``(B, C, H_l, W_l)``.
            tgt: ``(B, NQ, C)`` content queries (one-stage; with denoising, its queries
                first), or None (two-stage).
            anchors: ``(B, NQ, 4)`` their initial anchors in [0, 1] (one-stage), or None.
            enc_heads: two-stage: ``[class head, box head]`` that score and refine the
                encoder's proposals.
            self_attn_mask: decoder self-attention mask (see ``DeformableDecoderLayer``).
            prefix: ``(content (B, PAD, C), anchors (B, PAD, 4) in [0, 1])`` of queries the
                decoder takes before the selected proposals (two-stage denoising, DINO).

        Returns:
            ``hs`` ``(N, B, T, C)``, ``boxes`` ``(N, B, T, 4)`` (every layer's refined
            anchors), ``references`` ``(N, B, T, 4)`` (the anchors each layer used), T = PAD +
            NQ with ``prefix`` (its queries first), else NQ; and two-stage ``enc_logits``
            ``(B, S, K_cls)`` and ``enc_boxes`` ``(B, S, 4)`` (DINO's proposals: the NQ
            selected ones, ``(B, NQ, K_cls)`` and ``(B, NQ, 4)``; see ``EncoderProposals``).
        """
        # L (H_l, W_l) as Python ints, not a tensor: the attentions need ints, which a tensor
        # would give through a device sync in each of them, and torch.export keeps these
        # symbolic (the ONNX graph's dynamic image sizes)
        flat_src, flat_mask, flat_pos, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(tuple(src.shape[-2:]))
            # (B, C, H, W) -> (B, HW, C), tokens in row-major order
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_mask.append(mask.flatten(1))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl])
        src = torch.cat(flat_src, 1)  # (B, S, C)
        mask = torch.cat(flat_mask, 1)  # (B, S)
        pos = torch.cat(flat_pos, 1)  # (B, S, C)
        sizes = [h * w for h, w in spatial_shapes]
        # (L,) index of each level's first token
        # (made on the host, copied without waiting: a blocking copy would synchronise)
        level_start_index = torch.tensor([sum(sizes[:lvl]) for lvl in range(len(sizes))],
                                         dtype=torch.long).to(src.device, non_blocking=True)
        # (B, L, 2), in float32 as in the official code, whatever the model's precision
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, ratios, mask)

        out: Dict[str, torch.Tensor] = {}
        if self.proposals is not None:
            # the proposals module raises if it needs heads and gets none
            tgt, anchors, out["enc_logits"], out["enc_boxes"] = self.proposals(
                memory, mask, spatial_shapes, *(enc_heads or (None, None))
            )
            if prefix is not None:
                tgt = torch.cat([prefix[0], tgt], 1)
                anchors = torch.cat([prefix[1], anchors], 1)
        elif tgt is None or anchors is None:
            raise ValueError("the one-stage transformer needs tgt and anchors")
        out["hs"], out["boxes"], out["references"] = self.decoder(
            tgt, anchors, memory, spatial_shapes, level_start_index, ratios, mask,
            self_attn_mask,
        )
        return out
