"""COCO-format datasets named in the config, and the class-count check against the model.

``DATASETS.REGISTER_COCO`` lists ``(name, annotation json, image folder)`` triples; train_net
registers them with Detectron2's ``register_coco_instances`` so that any COCO-format dataset
trains and evaluates without writing Python::

    python train_net.py --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml \\
        DATASETS.REGISTER_COCO "(('mine_train', 'ann/train.json', 'img/train'), \\
                                 ('mine_val', 'ann/val.json', 'img/val'))" \\
        DATASETS.TRAIN "('mine_train',)" DATASETS.TEST "('mine_val',)" \\
        MODEL.DAB_DETR.NUM_CLASSES 3
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..utils.user_errors import (
    InputFileNotFoundError,
    InputValueError,
    UnknownKeyError,
    closest,
)
from .builtin import BUILTIN_DATASETS

__all__ = ["check_datasets", "check_num_classes", "register_coco_datasets"]


def register_coco_datasets(entries: Iterable[Sequence[str]]) -> list[str]:
    """Register COCO-format datasets given as ``(name, json_file, image_root)`` triples.

    A name registered before with the same files is left as it is, so calling this again (each
    worker of a distributed run does) is harmless.

    Args:
        entries: the triples, as in ``cfg.DATASETS.REGISTER_COCO``.

    Returns:
        The registered names.

    Raises:
        InputValueError: an entry is not a triple of strings, or its name is taken by other
            files.
        InputFileNotFoundError: the json or the image folder of an entry does not exist.
    """
    names = []
    for i, entry in enumerate(entries):
        where = f"DATASETS.REGISTER_COCO[{i}]"
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise InputValueError(
                f"{where} must be a triple (name, annotation json, image folder) of non-empty "
                f"strings, got {entry!r}"
            )
        name, json_file, image_root = entry
        if not os.path.isfile(json_file):
            raise InputFileNotFoundError(f"{where} ({name!r}): no annotation file {json_file}")
        if not os.path.isdir(image_root):
            raise InputFileNotFoundError(f"{where} ({name!r}): no image folder {image_root}")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root)
            if not same:
                raise InputValueError(
                    f"{where}: dataset name {name!r} is already registered with "
                    f"json_file={meta.get('json_file')!r}; choose another name"
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


def check_datasets(key: str, names: Iterable[str]) -> None:
    """Check that every dataset named under the config key ``key`` (``"DATASETS.TRAIN"``) is
    registered and, where its metadata names files (COCO-format datasets: Detectron2's own
    ``coco_2017_*``, those of ``DATASETS.REGISTER_COCO``), that they exist, before anything
    is built.

    Raises:
        UnknownKeyError: a name is not registered; the nearest registered names are given.
        InputFileNotFoundError: a dataset's annotation file or image folder is missing.
    """
    for name in names:
        if name not in DatasetCatalog.list():
            near = closest(name, DatasetCatalog.list())
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise UnknownKeyError(
                f"{key}: no dataset is registered as {name!r}; {hint}A COCO-format dataset of "
                "your own is registered by DATASETS.REGISTER_COCO (name, json, image folder)"
            )
        if name in BUILTIN_DATASETS:
            continue  # generated on first use
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        if json_file and not os.path.isfile(json_file):
            raise InputFileNotFoundError(
                f"{key}: dataset {name!r} has no annotation file {json_file}{_where(json_file)}"
            )
        if image_root and not os.path.isdir(image_root):
            raise InputFileNotFoundError(
                f"{key}: dataset {name!r} has no image folder {image_root}{_where(image_root)}"
            )


def _where(path: str) -> str:
    """For Detectron2's built-in datasets: where it looks, and how to point it elsewhere."""
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    if os.path.normpath(path).startswith(os.path.normpath(root) + os.sep):
        return (f" (Detectron2 reads its datasets under $DETECTRON2_DATASETS, now {root!r}: "
                "set it to the folder that holds coco/)")
    return ""


def check_num_classes(num_classes: int, dataset_names: Iterable[str]) -> None:
    """Check the model's class count against each dataset's ``thing_classes``.

    Datasets whose classes are not known yet are skipped: a COCO json registered with
    ``register_coco_instances`` sets them when it is first loaded, so call this again after
    building the data loaders.

    Raises:
        ValueError: naming the dataset, its classes and the key to set.
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise InputValueError(
                f"MODEL.DAB_DETR.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                f"{len(classes)} classes ({shown}); set MODEL.DAB_DETR.NUM_CLASSES "
                f"{len(classes)}"
            )
