"""Building blocks that know nothing of Detectron2 or of a particular model: attention through
``scaled_dot_product_attention``, multi-scale deformable attention in pure PyTorch, sine
position encodings, the MLP and box operations."""

from .attention import (
    Attention,
    EncoderSelfAttention,
    PackedAttention,
    key_padding_to_attn_mask,
    multi_head_attention,
)
from .box_ops import inverse_sigmoid, refine_boxes
from .initialisation import copy_first_parameters
from .mlp import MLP, post_norm_ffn
from .ms_deform_attn import (
    MSDeformAttn,
    SpatialShapes,
    level_shapes,
    multi_scale_deformable_attention,
)
from .position_encoding import PositionEmbeddingSine, box_sine_embedding, sine_features

__all__ = [
    "MLP",
    "Attention",
    "EncoderSelfAttention",
    "MSDeformAttn",
    "PackedAttention",
    "PositionEmbeddingSine",
    "SpatialShapes",
    "box_sine_embedding",
    "copy_first_parameters",
    "inverse_sigmoid",
    "key_padding_to_attn_mask",
    "level_shapes",
    "multi_head_attention",
    "multi_scale_deformable_attention",
    "post_norm_ffn",
    "refine_boxes",
    "sine_features",
]
