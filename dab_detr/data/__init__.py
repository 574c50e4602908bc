"""Datasets for DAB-DETR: the built-in synthetic ``dab_shapes`` detection dataset."""

from .builtin import (
    BUILTIN_DATASETS,
    CLASS_NAMES,
    DATASET_VERSION,
    default_datasets_root,
    ensure_builtin_dataset,
    generate_shapes_dataset,
    register_builtin_datasets,
)

__all__ = [
    "BUILTIN_DATASETS",
    "CLASS_NAMES",
    "DATASET_VERSION",
    "default_datasets_root",
    "ensure_builtin_dataset",
    "generate_shapes_dataset",
    "register_builtin_datasets",
]
