"""Datasets for DAB-DETR: the built-in synthetic ``dab_shapes`` detection dataset, and COCO-format
datasets named in the config."""

from .builtin import (
    BUILTIN_DATASETS,
    CLASS_NAMES,
    DATASET_VERSION,
    default_datasets_root,
    ensure_builtin_dataset,
    generate_shapes_dataset,
    register_builtin_datasets,
)
from .coco import check_num_classes, register_coco_datasets

__all__ = [
    "BUILTIN_DATASETS",
    "CLASS_NAMES",
    "DATASET_VERSION",
    "default_datasets_root",
    "check_num_classes",
    "ensure_builtin_dataset",
    "generate_shapes_dataset",
    "register_builtin_datasets",
    "register_coco_datasets",
]
