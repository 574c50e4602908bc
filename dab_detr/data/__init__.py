"""Data for DAB-DETR: the built-in synthetic ``dab_shapes`` detection dataset, COCO-format
datasets named in the config, the training set of a config, the image reading and annotation
checks every dataset goes through, and DETR's augmentation as a Detectron2 dataset mapper."""

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
from .coco import check_datasets, check_num_classes, register_coco_datasets
from .dataset_mapper import DabDetrDatasetMapper
from .images import UnreadableImageError, read_image
from .train_dicts import load_train_dicts

__all__ = [
    "BUILTIN_DATASETS",
    "CLASS_NAMES",
    "DATASET_VERSION",
    "DabDetrDatasetMapper",
    "UnreadableImageError",
    "check_annotations",
    "check_datasets",
    "default_datasets_root",
    "check_num_classes",
    "ensure_builtin_dataset",
    "generate_shapes_dataset",
    "load_train_dicts",
    "read_image",
    "register_builtin_datasets",
    "register_coco_datasets",
]
