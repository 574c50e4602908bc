"""The Detectron2 side of the models: meta-architectures registered in ``META_ARCH_REGISTRY``
and the backbone builder they use. The only model files that import Detectron2."""

from . import backbone  # noqa: F401  (import registers the ResNet and DAT backbones)
from .dab_deformable_detr import DABDeformableDETR  # import registers it
from .dab_detr import DABDETR  # import registers the meta-architecture
from .detr import DETR, ConditionalDETR  # import registers them
from .dino import DINO  # import registers it

__all__ = ["DABDETR", "DABDeformableDETR", "ConditionalDETR", "DETR", "DINO"]
