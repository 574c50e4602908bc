"""The training set of a config: the dicts of ``DATASETS.TRAIN``, checked against the model."""

import json
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.utils.file_io import PathManager

from .annotations import check_annotations
from .coco import check_num_classes

__all__ = ["load_train_dicts"]


def load_train_dicts(cfg: CfgNode) -> list[dict[str, Any]]:
    """The dicts of ``DATASETS.TRAIN``, each dataset checked against the model's classes and
    by :func:`~dab_detr.data.annotations.check_annotations`; images without non-crowd boxes are
    removed when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``."""
    num_classes = cfg.MODEL.DAB_DETR.NUM_CLASSES
    dataset_dicts = []
    for name in cfg.DATASETS.TRAIN:
        try:
            loaded = get_detection_dataset_dicts([name], filter_empty=False)
        except KeyError as e:  # load_coco_json: a category id missing from 'categories'
            raise _unknown_category_error(name, e) from e
        check_num_classes(num_classes, [name])  # known now; a clearer error than per box
        dataset_dicts += check_annotations(loaded, num_classes, name)
    if len(cfg.DATASETS.TRAIN) > 1:  # same classes in the same order, as Detectron2 checks
        check_metadata_consistency("thing_classes", cfg.DATASETS.TRAIN)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if not dataset_dicts:
        raise ValueError(f"DATASETS.TRAIN {cfg.DATASETS.TRAIN} has no image to train on")
    return dataset_dicts


def _unknown_category_error(name: str, error: KeyError) -> Exception:
    """Name the json file and the annotations whose category is not among its categories."""
    json_file = MetadataCatalog.get(name).get("json_file")
    if not json_file:
        return error
    with PathManager.open(json_file) as f:
        data = json.load(f)
    known = sorted(c["id"] for c in data.get("categories", []))
    bad = [a for a in data.get("annotations", []) if a.get("category_id") not in set(known)]
    if not bad:
        return error
    shown = "; ".join(
        f"annotation id {a.get('id')} of image id {a.get('image_id')}: category_id "
        f"{a.get('category_id')}"
        for a in bad[:5]
    )
    return ValueError(
        f"dataset {name!r} ({json_file}): {len(bad)} annotation(s) have a category_id that is "
        f"not among the json's categories {known}: {shown}{'; ...' if len(bad) > 5 else ''}"
    )

