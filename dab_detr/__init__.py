"""DAB-DETR as a Detectron2 project: ``import dab_detr`` registers the ``DABDETR``
meta-architecture and exposes ``add_dab_detr_config``."""

from ._compat import apply as _apply_compat

_apply_compat()  # must run before the first import of detectron2

from . import backbone  # noqa: E402, F401  (import registers build_dab_detr_resnet_backbone)
from .config import add_dab_detr_config, get_dab_detr_cfg  # noqa: E402
from .dab_detr import DABDETR  # noqa: E402  (import registers the meta-architecture)

__all__ = ["DABDETR", "add_dab_detr_config", "get_dab_detr_cfg"]
__version__ = "0.1.0"
