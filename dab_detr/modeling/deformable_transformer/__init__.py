"""DAB-Deformable-DETR's transformer: Deformable DETR's multi-scale encoder and an anchor-box
decoder whose cross-attention is multi-scale deformable attention around each anchor; with
two stages, the encoder proposes the anchors."""

from .decoder import DABDeformableDecoder, DeformableDecoderLayer
from .encoder import (
    DeformableEncoder,
    DeformableEncoderLayer,
    encoder_reference_points,
    valid_ratios,
)
from .transformer import DABDeformableTransformer
from .two_stage import TWO_STAGE_QUERIES, EncoderProposals, encoder_output_proposals

__all__ = [
    "DABDeformableDecoder",
    "DABDeformableTransformer",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "EncoderProposals",
    "TWO_STAGE_QUERIES",
    "encoder_output_proposals",
    "encoder_reference_points",
    "valid_ratios",
]
