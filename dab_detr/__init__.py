"""DAB-DETR as a Detectron2 project: ``import dab_detr`` registers the ``DABDETR``,
``DABDeformableDETR``, ``DETR``, ``ConditionalDETR`` and ``DINO`` meta-architectures and their
backbone, and exposes ``add_dab_detr_config``.

Layout: ``layers`` (building blocks) and ``modeling`` (the models) are plain PyTorch and
import without Detectron2; ``modeling.meta_arch``, ``config``, ``data``, ``engine`` and
``checkpoint`` build on Detectron2.
"""

import importlib.util

from ._compat import apply as _apply_compat
from ._compat import quiet_dependency_imports as _quiet_dependency_imports

__all__ = [
    "DABDETR", "DABDeformableDETR", "DETR", "ConditionalDETR", "DINO", "add_dab_detr_config",
    "get_dab_detr_cfg",
]
__version__ = "0.1.0"


def _detectron2_installed() -> bool:
    try:
        return importlib.util.find_spec("detectron2") is not None
    except (ImportError, ValueError):
        return False


if _detectron2_installed():
    _apply_compat()  # must run before the first import of detectron2
    with _quiet_dependency_imports():  # the first import of Detectron2 and fvcore
        from .config import add_dab_detr_config, get_dab_detr_cfg

        # import registers them
        from .modeling.meta_arch import DABDETR, DETR, DINO, ConditionalDETR, DABDeformableDETR
else:

    def __getattr__(name: str):
        # dab_detr.layers and dab_detr.modeling work without Detectron2; the rest needs it
        if name in __all__:
            raise ImportError(
                f"dab_detr.{name} needs Detectron2, which is not installed (see README.md, "
                "'Installation')"
            )
        raise AttributeError(f"module 'dab_detr' has no attribute {name!r}")
