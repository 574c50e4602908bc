"""The models, in plain PyTorch: the transformers of DAB-DETR and DAB-Deformable-DETR, the
Hungarian matcher and the set criterion. Only :mod:`dab_detr.modeling.meta_arch` (not
imported here) knows Detectron2."""

from .criterion import SetCriterion
from .deformable_transformer import DABDeformableTransformer
from .matcher import HungarianMatcher
from .transformer import DABTransformer

__all__ = ["DABDeformableTransformer", "DABTransformer", "HungarianMatcher", "SetCriterion"]
