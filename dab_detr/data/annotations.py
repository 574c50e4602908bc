"""Checks of a dataset's annotations before training: what no augmentation can make trainable
is dropped with one counted warning, and a class the model does not have is refused."""

import logging
import math
import numbers
from collections import Counter
from typing import Any

from detectron2.structures import BoxMode

__all__ = ["check_annotations"]

logger = logging.getLogger(__name__)


def check_annotations(
    dataset_dicts: list[dict[str, Any]], num_classes: int, dataset_name: str
) -> list[dict[str, Any]]:
    """Drop the boxes no augmentation can make trainable, and refuse unknown classes.

    A non-crowd box with non-finite coordinates, a zero or negative width or height, or no
    area inside its image (when the dict gives the image size) is dropped, and one warning
    counts them by reason, naming the first of each. A box partly outside its image is kept:
    the mapper clips it. Crowd annotations are left alone: the mapper drops them.

    Args:
        dataset_dicts: the dataset in Detectron2's format (not modified).
        num_classes: the model's class count; ``category_id`` must be in ``[0, num_classes)``.
        dataset_name: named in the warning and errors.

    Returns:
        The dicts, those that lost boxes replaced by shallow copies without them.

    Raises:
        ValueError: naming the image and annotation, for a missing or malformed ``bbox`` or a
            ``category_id`` outside ``[0, num_classes)``.
    """
    dropped: Counter[str] = Counter()
    first: dict[str, str] = {}
    total = 0
    checked = []
    for record in dataset_dicts:
        annotations = record.get("annotations") or []
        kept = []
        for i, obj in enumerate(annotations):
            if obj.get("iscrowd", 0):
                kept.append(obj)
                continue
            total += 1
            try:
                problem = _box_problem(obj, num_classes, record.get("height"), record.get("width"))
            except ValueError as e:
                raise ValueError(f"{dataset_name}: {_where(record, i)} {e}") from None
            if problem is None:
                kept.append(obj)
            else:
                dropped[problem] += 1
                first.setdefault(problem, _where(record, i))
        if len(kept) != len(annotations):
            record = {**record, "annotations": kept}
        checked.append(record)
    if dropped:
        reasons = "; ".join(f"{n} with {p} (first: {first[p]})" for p, n in dropped.items())
        logger.warning(
            f"{dataset_name}: dropped {sum(dropped.values())} of {total} boxes that cannot be "
            f"trained on: {reasons}"
        )
    return checked


def _where(record: dict[str, Any], index: int) -> str:
    obj = record["annotations"][index]
    ann_id = f" (id {obj['id']})" if "id" in obj else ""
    image = f"image {record.get('image_id')} ({record.get('file_name')})"
    return f"annotation {index}{ann_id} of {image}"


def _box_problem(
    obj: dict[str, Any], num_classes: int, height: int | None, width: int | None
) -> str | None:
    """Why the box of ``obj`` cannot be trained on, or ``None`` if it can.

    Raises:
        ValueError: for a ``category_id`` outside ``[0, num_classes)``, or a malformed box.
    """
    category = obj.get("category_id")
    if (
        isinstance(category, bool)
        or not isinstance(category, numbers.Integral)
        or not 0 <= category < num_classes
    ):
        raise ValueError(
            f"has category_id {category!r}, but the model's classes are 0 to {num_classes - 1} "
            f"(MODEL.DAB_DETR.NUM_CLASSES {num_classes}); fix the annotation or the dataset's "
            "class mapping"
        )
    bbox = obj.get("bbox")
    if bbox is None or len(bbox) != 4 or "bbox_mode" not in obj:
        raise ValueError(
            f"needs a 4-number 'bbox' and a 'bbox_mode', got bbox={bbox!r}, "
            f"bbox_mode={obj.get('bbox_mode')!r}"
        )
    mode = obj["bbox_mode"]
    # plain arithmetic for the two detection modes: BoxMode.convert costs ~50 us a box, a
    # minute for COCO
    if mode == BoxMode.XYWH_ABS:
        x0, y0, w, h = map(float, bbox)
        x1, y1 = x0 + w, y0 + h
    elif mode == BoxMode.XYXY_ABS:
        x0, y0, x1, y1 = map(float, bbox)
    else:
        x0, y0, x1, y1 = map(float, BoxMode.convert(list(bbox), mode, BoxMode.XYXY_ABS))
    if not math.isfinite(x0 + y0 + x1 + y1):  # a NaN or an infinity makes the sum one
        return "non-finite coordinates"
    if x1 <= x0 or y1 <= y0:
        return "zero or negative width or height"
    if height and width and (min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0)):
        return "no area inside the image"
    return None
