"""The models, in plain PyTorch: the transformers of DAB-DETR, DAB-Deformable-DETR and DETR, the
Hungarian matcher and the set criterion. Only :mod:`dab_detr.modeling.meta_arch` (not
imported here) knows Detectron2."""

from .criterion import SetCriterion
from .deformable_transformer import DABDeformableTransformer
from .matcher import HungarianMatcher
from .transformer import DABTransformer, DETRTransformer

__all__ = [
    "DABDeformableTransformer", "DABTransformer", "DETRTransformer", "HungarianMatcher",
    "SetCriterion",
]
