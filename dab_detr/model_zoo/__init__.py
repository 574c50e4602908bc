"""Detectron2's ``model_zoo`` API for this project's configs: ``get_config_file``,
``get_config``, ``get_checkpoint_url`` and ``get``, with ``config_path`` relative to
``configs/`` (e.g. ``"COCO-Detection/dab_detr_R_50_50ep.yaml"``). The configs are installed
with the package (``dab_detr/model_zoo/configs``, made by setup.py)."""

from .model_zoo import get, get_checkpoint_url, get_config, get_config_file
from .released import RELEASED_WEIGHTS, ReleasedWeights

__all__ = [
    "RELEASED_WEIGHTS",
    "ReleasedWeights",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
]
