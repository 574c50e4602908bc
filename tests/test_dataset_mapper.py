"""Tests of ``dab_detr.data.dataset_mapper``: DETR's augmentation as a Detectron2 dataset mapper."""

import copy  # noqa: I001  (dab_detr must be imported before detectron2)
import sys
from pathlib import Path
from typing import Any

import dab_detr  # first: applies the compat shims detectron2 needs
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from dab_detr.data.dataset_mapper import (
    DabDetrDatasetMapper,
    RandomSelect,
    build_dab_detr_augmentation,
)

H, W = 120, 160
# XYWH_ABS boxes: one on the left, one on the right, one in the middle.
BOXES_XYWH = [[10.0, 20.0, 30.0, 40.0], [110.0, 60.0, 40.0, 50.0], [60.0, 30.0, 30.0, 30.0]]


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    """A random 120x160 RGB image saved as PNG (lossless, so pixels can be compared)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    return path


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def _dataset_dict(path: Path, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "file_name": str(path),
        "height": H,
        "width": W,
        "image_id": 7,
        "annotations": annotations,
    }


def _annotations(iscrowd: int = 0) -> list[dict[str, Any]]:
    # A polygon and keypoints the mapper must discard without transforming.
    return [
        {
            "bbox": list(box),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": i,
            "iscrowd": iscrowd,
            "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0], box[1] + box[3]]],
            "keypoints": [box[0], box[1], 2],
        }
        for i, box in enumerate(BOXES_XYWH)
    ]


def _xyxy(boxes_xywh: list[list[float]]) -> torch.Tensor:
    b = torch.tensor(boxes_xywh)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def _small_cfg(crop: bool = True):
    cfg = get_cfg()
    dab_detr.add_dab_detr_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 96)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 60
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.CROP.ENABLED = crop
    cfg.INPUT.CROP.SIZE = (32, 64)
    return cfg


def _assert_boxes_inside(out: dict[str, Any]) -> None:
    _, h, w = out["image"].shape
    boxes = out["instances"].gt_boxes.tensor
    assert out["instances"].image_size == (h, w)
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
    assert bool((boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all())
    assert bool((boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all())


def test_train_boxes_inside_image(image_file: Path) -> None:
    np.random.seed(0)
    mapper = DabDetrDatasetMapper(_small_cfg(), is_train=True)
    d = _dataset_dict(image_file, _annotations())
    d_before = copy.deepcopy(d)
    out = mapper(d)
    assert out["image"].dtype == torch.uint8
    assert out["image"].dim() == 3 and out["image"].shape[0] == 3
    _assert_boxes_inside(out)
    assert "annotations" not in out
    assert (out["file_name"], out["image_id"], out["height"], out["width"]) == (
        str(image_file),
        7,
        H,
        W,
    )
    assert d == d_before  # the dataset's dict is not modified


def test_forced_flip_mirrors_image_and_boxes(image_file: Path) -> None:
    mapper = DabDetrDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB"
    )
    out = mapper(_dataset_dict(image_file, _annotations()))
    assert torch.equal(out["image"], _pixels(image_file).flip(-1))
    xyxy = _xyxy(BOXES_XYWH)
    expected = torch.stack([W - xyxy[:, 2], xyxy[:, 1], W - xyxy[:, 0], xyxy[:, 3]], dim=1)
    assert torch.equal(out["instances"].gt_boxes.tensor, expected)
    assert torch.equal(out["instances"].gt_classes, torch.tensor([0, 1, 2]))
    # Masks and keypoints are not produced.
    assert set(out["instances"].get_fields()) == {"gt_boxes", "gt_classes"}


def test_forced_crop_clips_and_drops_boxes(image_file: Path) -> None:
    # Crop x in [0, 80), y in [10, 110): box 0 is inside, box 1 (x >= 110) is outside,
    # box 2 (x in [60, 90)) is cut at x = 80.
    crop = T.CropTransform(x0=0, y0=10, w=80, h=100)
    mapper = DabDetrDatasetMapper(is_train=True, augmentations=[crop], image_format="RGB")
    out = mapper(_dataset_dict(image_file, _annotations()))
    assert torch.equal(out["image"], _pixels(image_file)[:, 10:110, 0:80])
    expected = torch.tensor([[10.0, 10.0, 40.0, 50.0], [60.0, 20.0, 80.0, 50.0]])
    assert torch.equal(out["instances"].gt_boxes.tensor, expected)
    assert torch.equal(out["instances"].gt_classes, torch.tensor([0, 2]))
    _assert_boxes_inside(out)


@pytest.mark.parametrize("annotations", [[], None, "crowd"])
def test_images_without_boxes_are_kept(image_file: Path, annotations: Any) -> None:
    if annotations == "crowd":
        annotations = _annotations(iscrowd=1)
    d = _dataset_dict(image_file, annotations)
    if annotations is None:
        del d["annotations"]
    mapper = DabDetrDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB"
    )
    out = mapper(d)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    assert out["instances"].gt_classes.shape == (0,)
    assert out["image"].shape == (3, H, W)


def test_crowd_boxes_dropped_among_others(image_file: Path) -> None:
    annotations = _annotations()
    annotations[1]["iscrowd"] = 1
    mapper = DabDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    out = mapper(_dataset_dict(image_file, annotations))
    assert torch.equal(out["instances"].gt_boxes.tensor, _xyxy([BOXES_XYWH[0], BOXES_XYWH[2]]))
    assert torch.equal(out["instances"].gt_classes, torch.tensor([0, 2]))


def test_test_mode_resizes_and_drops_annotations(image_file: Path) -> None:
    mapper = DabDetrDatasetMapper(_small_cfg(), is_train=False)
    out = mapper(_dataset_dict(image_file, _annotations()))
    assert "instances" not in out and "annotations" not in out
    # Short edge 120 -> 60: the image is halved, 160 -> 80.
    assert out["image"].shape == (3, 60, 80) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"], out["image_id"]) == (H, W, 7)


def test_train_pipeline_structure() -> None:
    augs = build_dab_detr_augmentation(_small_cfg(), is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, RandomSelect]
    assert augs[0].horizontal and not augs[0].vertical and augs[0].prob == 0.5
    select = augs[1]
    assert select.prob == 0.5
    assert isinstance(select.aug_a, T.ResizeShortestEdge)
    assert select.aug_a.short_edge_length == (64, 96) and select.aug_a.max_size == 1333
    pre_resize, crop, resize = select.aug_b.augs
    assert pre_resize.short_edge_length == (400, 500, 600) and pre_resize.max_size == sys.maxsize
    assert pre_resize.sample_style == "choice"
    assert crop.crop_type == "absolute_range" and tuple(crop.crop_size) == (32, 64)
    assert resize.short_edge_length == (64, 96) and resize.max_size == 1333

    no_crop = build_dab_detr_augmentation(_small_cfg(crop=False), is_train=True)
    assert [type(a) for a in no_crop] == [T.RandomFlip, T.ResizeShortestEdge]

    scaled = _small_cfg()
    scaled.INPUT.CROP.PRE_RESIZE_SHORT_EDGES = (40, 50)
    pre_resize = build_dab_detr_augmentation(scaled, is_train=True)[1].aug_b.augs[0]
    assert pre_resize.short_edge_length == (40, 50) and pre_resize.max_size == sys.maxsize

    test_augs = build_dab_detr_augmentation(_small_cfg(), is_train=False)
    assert [type(a) for a in test_augs] == [T.ResizeShortestEdge]
    assert test_augs[0].short_edge_length == (60, 60) and test_augs[0].max_size == 1333


def test_bad_pre_resize_rejected() -> None:
    cfg = _small_cfg()
    cfg.INPUT.CROP.PRE_RESIZE_SHORT_EDGES = (0, 50)
    with pytest.raises(ValueError, match="INPUT.CROP.PRE_RESIZE_SHORT_EDGES.*got \\(0, 50\\)"):
        build_dab_detr_augmentation(cfg, is_train=True)


def test_relative_crop_size_rejected() -> None:
    cfg = _small_cfg()
    cfg.INPUT.CROP.SIZE = [0.9, 0.9]  # Detectron2's default, a relative size
    with pytest.raises(ValueError, match="CROP.SIZE"):
        build_dab_detr_augmentation(cfg, is_train=True)


def test_random_select_takes_both_branches_reproducibly() -> None:
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    select = RandomSelect(T.HFlipTransform(6), [T.VFlipTransform(4)], prob=0.5)

    def draw(seed: int) -> list[str]:
        np.random.seed(seed)
        names = []
        for _ in range(200):
            tfm = select(T.AugInput(image.copy()))
            names.append(type(tfm.transforms[0]).__name__)
        return names

    names = draw(3)
    assert draw(3) == names
    n_h = names.count("HFlipTransform")
    assert n_h + names.count("VFlipTransform") == 200
    assert 70 < n_h < 130  # binomial(200, 0.5): far outside 6 standard deviations otherwise


def test_default_train_pipeline_many_seeds(image_file: Path) -> None:
    mapper = DabDetrDatasetMapper(_small_cfg(), is_train=True)
    d = _dataset_dict(image_file, _annotations())
    n_boxes = set()
    for seed in range(50):
        np.random.seed(seed)
        out = mapper(d)
        _assert_boxes_inside(out)
        # The last augmentation is always the multi-scale resize to a short edge of 64 or 96.
        assert min(out["image"].shape[1:]) in (64, 96)
        n_boxes.add(len(out["instances"]))
        np.random.seed(seed)
        again = mapper(d)
        assert torch.equal(again["image"], out["image"])
        assert torch.equal(again["instances"].gt_boxes.tensor, out["instances"].gt_boxes.tensor)
    # The crop branch must have dropped boxes at least once; the resize branch keeps all 3.
    assert 3 in n_boxes and len(n_boxes) > 1
