"""DAB-DETR's transformer: the encoder over image tokens and the anchor-box decoder, which
refines each query's anchor layer by layer and modulates its positional attention by the
anchor's width and height; with switches, Conditional DETR's. DETR's transformer (``detr.py``)
shares the encoder."""

from .decoder import TransformerDecoder, TransformerDecoderLayer, modulate_hw
from .detr import DETRDecoder, DETRDecoderLayer, DETRTransformer
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .transformer import DABTransformer

__all__ = [
    "DABTransformer",
    "DETRDecoder",
    "DETRDecoderLayer",
    "DETRTransformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "modulate_hw",
]
