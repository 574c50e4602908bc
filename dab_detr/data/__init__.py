"""Datasets for DAB-DETR: the built-in synthetic ``dab_shapes`` detection dataset, COCO-format
datasets named in the config, and the image reading and annotation checks every dataset goes
through."""

from .annotations import check_annotations
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
from .images import UnreadableImageError, read_image

__all__ = [
    "BUILTIN_DATASETS",
    "CLASS_NAMES",
    "DATASET_VERSION",
    "UnreadableImageError",
    "check_annotations",
    "default_datasets_root",
    "check_num_classes",
    "ensure_builtin_dataset",
    "generate_shapes_dataset",
    "read_image",
    "register_builtin_datasets",
    "register_coco_datasets",
]
