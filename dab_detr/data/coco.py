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

__all__ = ["check_num_classes", "register_coco_datasets"]


def register_coco_datasets(entries: Iterable[Sequence[str]]) -> list[str]:
    """Register COCO-format datasets given as ``(name, json_file, image_root)`` triples.

    A name registered before with the same files is left as it is, so calling this again (each
    worker of a distributed run does) is harmless.

    Args:
        entries: the triples, as in ``cfg.DATASETS.REGISTER_COCO``.

    Returns:
        The registered names.

    Raises:
        ValueError: an entry is not a triple of strings, or its name is taken by other files.
        FileNotFoundError: the json or the image folder of an entry does not exist.
    """
    names = []
    for i, entry in enumerate(entries):
        where = f"DATASETS.REGISTER_COCO[{i}]"
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise ValueError(
                f"{where} must be a triple (name, annotation json, image folder) of non-empty "
                f"strings, got {entry!r}"
            )
        name, json_file, image_root = entry
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"{where} ({name!r}): no annotation file {json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{where} ({name!r}): no image folder {image_root}")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root)
            if not same:
                raise ValueError(
                    f"{where}: dataset name {name!r} is already registered with "
                    f"json_file={meta.get('json_file')!r}; choose another name"
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


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
            raise ValueError(
                f"MODEL.DAB_DETR.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                f"{len(classes)} classes ({shown}); set MODEL.DAB_DETR.NUM_CLASSES "
                f"{len(classes)}"
            )
