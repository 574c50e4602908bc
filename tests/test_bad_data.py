"""Bad training data is reported by name, or trained around, never a crash deep in the model.

Unreadable images (missing, truncated, not an image, empty) stop with the path, or are skipped
and counted with ``DATALOADER.SKIP_UNREADABLE_IMAGES``; unusual image modes and EXIF-rotated
JPEGs are read as upright RGB; boxes with no area are dropped with a counted warning, unknown
classes refused naming the annotation; empty and crowd-only images train. Datasets are small
COCO jsons on disk registered as users do, trained through train_net's ``Trainer``.
"""

import json
import logging
import math
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import train_net
from conftest import SHAPES_CONFIG as CONFIG
from conftest import SMALL, losses_by_iteration
from dab_detr.data import generate_shapes_dataset
from dab_detr.data.annotations import check_annotations
from dab_detr.data.dataset_mapper import DabDetrDatasetMapper
from dab_detr.data.images import UnreadableImageError
from dab_detr.engine import build_train_loader

# isort: split
from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode

NO_EVAL = ["DATASETS.TEST", "()", "DATALOADER.ASPECT_RATIO_GROUPING", "False"]


@pytest.fixture
def coco(tmp_path):
    """``make(num_images, edit=None) -> (name, json path, image folder)``: a shapes dataset
    in COCO format, its json passed through ``edit(data)`` and registered as ``mine_<n>``."""
    names = []

    def make(num_images, edit=None):
        name = f"mine_{len(names)}"
        root = tmp_path / name
        json_file = generate_shapes_dataset(str(root), "train", num_images, seed=len(names))
        if edit is not None:
            with open(json_file) as f:
                data = json.load(f)
            edit(data)
            with open(json_file, "w") as f:
                json.dump(data, f)
        register_coco_instances(name, {}, json_file, str(root / "train"))
        names.append(name)
        return name, json_file, root / "train"

    yield make
    for name in names:  # the catalogs are global
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(tmp_path, train, *opts):
    argv = ["--config-file", CONFIG, *SMALL, "OUTPUT_DIR", str(tmp_path / "out"),
            "DATASETS.TRAIN", f"('{train}',)", *NO_EVAL, *opts]
    return train_net.setup(default_argument_parser().parse_args(argv))


def _corrupt(path, kind):
    """Make ``path`` missing, truncated, not an image, or empty."""
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not an image")
    else:
        path.write_bytes(b"")


def _mapper(**kwargs):
    return DabDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB", **kwargs)


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "empty"])
def test_unreadable_image_error_names_the_file(kind, coco):
    name, _, folder = coco(1)
    path = folder / "000000.png"
    _corrupt(path, kind)
    record = DatasetCatalog.get(name)[0]
    with pytest.raises(UnreadableImageError, match=f"cannot read image {path}.*"
                       "SKIP_UNREADABLE_IMAGES"):
        _mapper()(record)
    assert _mapper(skip_unreadable=True)(record) is None
    # evaluation never skips: the image would silently miss from the results
    inference = DabDetrDatasetMapper(is_train=False, augmentations=[], skip_unreadable=True)
    with pytest.raises(UnreadableImageError, match=str(path)):
        inference(record)


def test_training_stops_at_an_unreadable_image(tmp_path, coco):
    name, _, folder = coco(4)
    _corrupt(folder / "000002.png", "truncated")
    trainer = train_net.Trainer(_cfg(tmp_path, name, "SOLVER.MAX_ITER", "2"))
    with pytest.raises(UnreadableImageError, match=str(folder / "000002.png")):
        trainer.train()


def test_skipped_unreadable_images_are_counted(tmp_path, coco, caplog):
    name, _, folder = coco(6)
    bad = {str(folder / "000001.png"), str(folder / "000004.png")}
    _corrupt(folder / "000001.png", "missing")
    _corrupt(folder / "000004.png", "text")
    cfg = _cfg(tmp_path, name, "SOLVER.MAX_ITER", "3", "DATALOADER.SKIP_UNREADABLE_IMAGES", "True")
    with caplog.at_level(logging.WARNING):
        trainer = train_net.Trainer(cfg)
        trainer.train()
    skips = [r for r in caplog.records if r.getMessage().startswith("Skipping an unreadable")]
    # 3 iterations x 4 of 6 images: the two bad ones are drawn at least once
    assert skips and all(any(b in r.getMessage() for b in bad) for r in skips)
    count = trainer._trainer.data_loader.num_skipped
    assert count == len(skips)
    assert trainer.storage.history("data/skipped_unreadable_images").latest() == count
    assert any(f"{count} unreadable training images were skipped" in r.getMessage()
               for r in caplog.records)
    assert sorted(losses_by_iteration(trainer)) == [0, 1, 2]
    assert all(math.isfinite(v) for v in losses_by_iteration(trainer).values())
    # the batches hold only readable images, still 4 per batch
    loader = build_train_loader(cfg, DabDetrDatasetMapper(cfg, True))
    for _, batch in zip(range(3), loader):
        assert len(batch) == 4 and not {d["file_name"] for d in batch} & bad


@pytest.mark.xfail(
    sys.version_info >= (3, 11), raises=TypeError, strict=True,
    reason="Detectron2's MapDataset (0.6 and later) retries with random.sample() on a set, "
           "which Python 3.11 refuses; train_net's loader (dab_detr.engine) does not use it",
)
def test_detectron2_map_dataset_takes_another_image_for_none(coco):
    """With Detectron2's own loaders, the mapper's ``None`` makes ``MapDataset`` retry with
    another index."""
    name, _, folder = coco(2)
    _corrupt(folder / "000000.png", "truncated")
    dataset = MapDataset(DatasetFromList(DatasetCatalog.get(name), copy=False),
                         _mapper(skip_unreadable=True))
    assert dataset[0]["file_name"] == str(folder / "000001.png")


def _png16(path, pixels, color_type):
    """A 16-bit PNG (PIL cannot write 16-bit colour): ``pixels`` uint16, HxW or HxWx3."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                         zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                     chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _write_mode(path, mode, rgb):
    """Save ``rgb`` (H, W, 3 uint8) in ``mode``; return the RGB pixels the file holds."""
    if mode == "gray16":
        gray = (rgb[..., 0].astype(np.uint16) << 8) | rgb[..., 1]
        Image.fromarray(gray).save(path)  # PIL mode I;16
        return np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "rgb16":
        _png16(path, (rgb.astype(np.uint16) << 8) | 0x7F, color_type=2)
        return rgb
    image = Image.fromarray(rgb).convert(mode)
    image.save(path)
    if mode == "P":  # the palette lookup, done here by hand
        palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
        return palette[np.asarray(image)]
    if mode in ("L", "LA"):
        gray = np.asarray(image)[..., 0] if mode == "LA" else np.asarray(image)
        return np.repeat(gray[..., None], 3, axis=2)
    return rgb  # RGBA: the colour channels


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "gray16", "rgb16"])
def test_image_modes_give_rgb(mode, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    expected = _write_mode(path, mode, rgb)
    box = [5.0, 6.0, 20.0, 10.0]
    record = {"file_name": str(path), "height": 30, "width": 40, "image_id": 1,
              "annotations": [{"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}
    out = _mapper()(record)
    torch.testing.assert_close(out["image"], torch.from_numpy(expected).permute(2, 0, 1))
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, torch.tensor([[5., 6., 25., 16.]]))


# EXIF orientation -> how the stored pixels are turned to give the upright picture
_UPRIGHT = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
            8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
def test_exif_rotated_jpeg_is_read_upright(orientation, tmp_path):
    upright = np.zeros((40, 64, 3), dtype=np.uint8)
    upright[8:20, 40:60] = 255  # a white box at x 40..60, y 8..20 in the upright picture
    stored = upright
    while not np.array_equal(_UPRIGHT[orientation](stored), upright):
        stored = np.rot90(stored) if orientation != 2 else np.fliplr(stored)
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)
    record = {"file_name": str(path), "height": 40, "width": 64, "image_id": 1,
              "annotations": [{"bbox": [40, 8, 60, 20], "bbox_mode": BoxMode.XYXY_ABS,
                               "category_id": 2}]}
    out = _mapper()(record)  # the size check would fail on a sideways image
    image = out["image"].float()
    assert image.shape == (3, 40, 64)
    assert image[:, 9:19, 41:59].min() > 200 and image[:, 22:, :].max() < 60
    torch.testing.assert_close(out["instances"].gt_boxes.tensor,
                               torch.tensor([[40.0, 8.0, 60.0, 20.0]]))


def _add_bad_boxes(data):
    """Append problem annotations to image 1 (shapes images are 160..224 px a side)."""
    image = next(i for i in data["images"] if i["id"] == 1)
    w, h = image["width"], image["height"]
    problems = [[10, 10, 0, 20], [10, 10, 20, -5], [w + 10, 5, 30, 30], [10, 10, float("nan"), 5],
                [w - 20, h - 20, 50, 50]]  # the last is partly outside: kept, clipped
    for k, bbox in enumerate(problems):
        data["annotations"].append({"id": 1000 + k, "image_id": 1, "category_id": 1,
                                    "bbox": bbox, "area": 1.0, "iscrowd": 0})


def test_boxes_without_area_are_dropped_and_counted(tmp_path, coco, caplog):
    name, _, _ = coco(4, _add_bad_boxes)
    cfg = _cfg(tmp_path, name, "SOLVER.MAX_ITER", "2")
    with caplog.at_level(logging.WARNING):
        trainer = train_net.Trainer(cfg)
    image = next(d for d in DatasetCatalog.get(name) if d["image_id"] == 1)
    n = sum(not a.get("iscrowd") for d in DatasetCatalog.get(name) for a in d["annotations"])
    first = len(image["annotations"]) - 5  # index of the first problem box in image 1
    where = f"of image 1 ({image['file_name']})"
    message = (f"{name}: dropped 4 of {n} boxes that cannot be trained on: 2 with zero or "
               f"negative width or height (first: annotation {first} {where}); 1 with no area "
               f"inside the image (first: annotation {first + 2} {where}); 1 with non-finite "
               f"coordinates (first: annotation {first + 3} {where})")
    assert message in caplog.text
    # the partly outside box reaches the model clipped to the image
    kept = check_annotations([image], 5, name)[0]
    assert len(kept["annotations"]) == len(image["annotations"]) - 4
    boxes = _mapper()(kept)["instances"].gt_boxes.tensor
    w, h = image["width"], image["height"]
    torch.testing.assert_close(boxes[-1], torch.tensor([w - 20.0, h - 20.0, w, h]))
    trainer.train()
    losses = losses_by_iteration(trainer)
    assert all(math.isfinite(v) for v in losses.values()) and len(losses) == 2


def test_unknown_category_in_json_names_the_annotation(tmp_path, coco):
    def unknown_category(data):
        data["annotations"][1]["category_id"] = 42

    name, json_file, _ = coco(3, unknown_category)
    with pytest.raises(ValueError) as info:
        train_net.Trainer(_cfg(tmp_path, name))
    ann = json.load(open(json_file))["annotations"][1]
    assert (f"dataset '{name}' ({json_file}): 1 annotation(s) have a category_id that is not "
            f"among the json's categories [1, 2, 3, 4, 5]: annotation id {ann['id']} of image id "
            f"{ann['image_id']}: category_id 42") in str(info.value)


@pytest.mark.parametrize("category", [5, -1, 2.0])
def test_class_outside_the_model_is_refused(category, tmp_path, coco):
    """A dataset registered with a function of its own, whose class ids are already
    contiguous (no json mapping catches them)."""
    source, _, _ = coco(3)
    records = DatasetCatalog.get(source)
    record = next(d for d in records if d["annotations"])
    record["annotations"][0]["category_id"] = category
    DatasetCatalog.register("custom_bad", lambda: records)
    MetadataCatalog.get("custom_bad").thing_classes = list("abcde")
    try:
        with pytest.raises(ValueError) as info:
            train_net.Trainer(_cfg(tmp_path, "custom_bad"))
    finally:
        DatasetCatalog.remove("custom_bad")
        MetadataCatalog.remove("custom_bad")
    assert (f"custom_bad: annotation 0 of image {record['image_id']} ({record['file_name']}) "
            f"has category_id {category!r}, but the model's classes are 0 to 4") in str(info.value)


def test_empty_and_crowd_only_images_train(tmp_path, coco):
    def empty_and_crowd(data):  # image 1: nothing; image 2: one crowd region
        data["annotations"] = [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [10, 10, 40, 30],
                                "area": 1200.0, "iscrowd": 1}]

    name, _, _ = coco(2, empty_and_crowd)
    records = DatasetCatalog.get(name)
    assert [[a["iscrowd"] for a in d["annotations"]] for d in records] == [[], [1]]
    cfg = _cfg(tmp_path, name)
    model = train_net.Trainer.build_model(cfg)
    model.train()
    mapper = DabDetrDatasetMapper(cfg, True)
    batch = [mapper(d) for d in records]
    assert [len(d["instances"]) for d in batch] == [0, 0]
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # and through the trainer, several iterations
    trainer = train_net.Trainer(_cfg(tmp_path, name, "SOLVER.MAX_ITER", "2",
                                     "SOLVER.IMS_PER_BATCH", "2"))
    trainer.train()
    assert all(math.isfinite(v) for v in losses_by_iteration(trainer).values())

