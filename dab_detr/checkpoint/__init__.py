"""Weights in and out: weight files read without running code from them, the architecture
record saved beside the weights, the Detectron2 checkpointer, and conversion of released
checkpoints (``python -m dab_detr.convert``)."""

from .arch_record import ARCH_KEY, ARCH_KEYS, architecture_record
from .checkpointer import CLASS_HEAD_PREFIX, TRAINING_MODEL_KEY, DabDetrCheckpointer
from .conversion import (
    BACKBONE_SOURCES,
    CONVERTERS,
    check_against_config,
    convert,
    convert_official,
    convert_state_dict,
    convert_torchvision,
    convert_transformers,
    detect_layout,
    state_dict_of,
)
from .dat import convert_dat
from .detrex import convert_detrex
from .renaming import coco_class_rows
from .safe_load import UnsafeCheckpointError, load_restricted_pickle, load_state_dict_file

__all__ = [
    "ARCH_KEY",
    "ARCH_KEYS",
    "BACKBONE_SOURCES",
    "CLASS_HEAD_PREFIX",
    "CONVERTERS",
    "DabDetrCheckpointer",
    "TRAINING_MODEL_KEY",
    "UnsafeCheckpointError",
    "architecture_record",
    "check_against_config",
    "coco_class_rows",
    "convert",
    "convert_dat",
    "convert_detrex",
    "convert_official",
    "convert_state_dict",
    "convert_torchvision",
    "convert_transformers",
    "detect_layout",
    "load_restricted_pickle",
    "load_state_dict_file",
    "state_dict_of",
]
