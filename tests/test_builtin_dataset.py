"""Tests for the built-in synthetic ``dab_shapes`` dataset (dab_detr/data/builtin.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dab_detr  # noqa: F401  (applies compatibility shims before detectron2 is imported)
from dab_detr.data import (
    CLASS_NAMES,
    builtin,
    ensure_builtin_dataset,
    generate_shapes_dataset,
    register_builtin_datasets,
)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode


@pytest.fixture(scope="module")
def val_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 60-image split at the default image size, shared by the read-only tests."""
    root = str(tmp_path_factory.mktemp("shapes"))
    return generate_shapes_dataset(root, "val", num_images=60, seed=1)


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_generation_is_deterministic(tmp_path):
    paths = [
        generate_shapes_dataset(str(tmp_path / d), "train", 12, seed=3, image_size=(96, 112))
        for d in ("a", "b")
    ]
    blobs = [Path(p).read_bytes() for p in paths]
    assert blobs[0] == blobs[1]
    data = json.loads(blobs[0])
    assert len(data["images"]) == 12 and len(data["annotations"]) > 0
    for img in data["images"]:
        files = [tmp_path / d / "train" / img["file_name"] for d in ("a", "b")]
        assert files[0].read_bytes() == files[1].read_bytes()
    # Per-image sizes vary (so batches need padding) and never exceed image_size.
    sizes = {(img["height"], img["width"]) for img in data["images"]}
    assert len(sizes) > 1 and all(h <= 96 and w <= 112 for h, w in sizes)
    other = generate_shapes_dataset(str(tmp_path / "c"), "train", 12, seed=4, image_size=(96, 112))
    assert Path(other).read_bytes() != blobs[0]


def test_json_is_a_cache(tmp_path):
    path = generate_shapes_dataset(str(tmp_path), "val", 3, seed=0, image_size=(64, 64))
    png = tmp_path / "val" / "000000.png"
    png.write_bytes(b"sentinel")  # a regeneration would overwrite it
    assert generate_shapes_dataset(str(tmp_path), "val", 3, seed=0, image_size=(64, 64)) == path
    assert png.read_bytes() == b"sentinel"
    # Other settings must not reuse the stale split.
    generate_shapes_dataset(str(tmp_path), "val", 5, seed=0, image_size=(64, 64))
    assert png.read_bytes() != b"sentinel"
    assert len(json.loads(Path(path).read_text())["images"]) == 5
    assert not [f for f in os.listdir(tmp_path / "annotations") if f.startswith(".tmp")]


def test_annotations_are_valid_coco(val_json):
    from pycocotools.coco import COCO

    coco = COCO(val_json)
    root = os.path.dirname(os.path.dirname(val_json))
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    counts = []
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(os.path.join(root, "val", img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        counts.append(len(anns))
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["category_id"] in coco.getCatIds() and ann["iscrowd"] == 0
            assert ann["area"] == pytest.approx(w * h)
            # No sliver too thin to recognise; none filling the whole image.
            assert min(w, h) >= 10 and w <= 0.95 * img["width"] and h <= 0.95 * img["height"]
    assert 0 in counts and max(counts) <= 6 and max(counts) >= 4
    assert len({a["category_id"] for a in coco.dataset["annotations"]}) == len(CLASS_NAMES)


def test_annotated_box_is_tight_box_of_drawn_shape():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        h, w = int(rng.integers(64, 225)), int(rng.integers(64, 225))
        spec = builtin.sample_shape(rng, h, w)
        seen.add(spec.category_id)
        background = np.full((h, w, 3), 17.0, dtype=np.float32)
        canvas = background.copy()
        box = builtin.draw_shape(canvas, spec, np.array([200.0, 90.0, 30.0]))
        drawn = np.any(canvas != background, axis=2)
        assert box == _tight_box(drawn)
        # The box is also the shape's geometric box: drawing does not lose its extremes.
        x0, y0, x1, y1 = spec.box
        np.testing.assert_allclose(box, [x0, y0, x1 - x0 + 1, y1 - y0 + 1], atol=1.0)
    assert seen == set(range(1, len(CLASS_NAMES) + 1))


@pytest.mark.parametrize(
    "name, fill_range, center_filled",
    [
        ("rectangle", (0.99, 1.0), True),
        ("ellipse", (0.74, 0.82), True),
        ("triangle", (0.45, 0.6), True),
        ("ring", (0.3, 0.7), False),
        ("cross", (0.4, 0.7), True),
    ],
)
def test_classes_differ_in_shape(name, fill_range, center_filled):
    # The classes must be told apart by shape: fill ratio of the box and a hole in the middle.
    spec = builtin.ShapeSpec(CLASS_NAMES.index(name) + 1, (10, 20, 89, 69), 0.3, 0)
    mask = builtin.shape_mask(spec, 100, 100)
    assert _tight_box(mask) == [10, 20, 80, 50]
    assert fill_range[0] <= mask[20:70, 10:90].mean() <= fill_range[1]
    assert mask[45, 50] == center_filled
    if name == "cross":
        assert not mask[20, 10] and not mask[69, 89]  # corners are empty


def test_registration_is_lazy_and_matches_detectron2(tmp_path):
    counts = {"dab_shapes_train": 4, "dab_shapes_val": 10}
    assert register_builtin_datasets(tmp_path, num_images=counts) == list(counts)
    register_builtin_datasets(tmp_path, num_images=counts)  # idempotent
    meta = MetadataCatalog.get("dab_shapes_val")
    assert meta.thing_classes == list(CLASS_NAMES) and meta.evaluator_type == "coco"
    assert not os.path.exists(meta.json_file)  # nothing generated until first use

    dicts = DatasetCatalog.get("dab_shapes_val")
    assert os.path.exists(meta.json_file) and len(dicts) == 10
    for d in dicts:
        assert os.path.exists(d["file_name"])
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < len(meta.thing_classes)
    assert sum(len(d["annotations"]) for d in dicts) > 0
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(len(CLASS_NAMES))}

    train_json = MetadataCatalog.get("dab_shapes_train").json_file
    assert not os.path.exists(train_json)
    assert ensure_builtin_dataset("dab_shapes_train") == train_json
    assert len(json.loads(Path(train_json).read_text())["images"]) == 4
    with pytest.raises(KeyError):
        ensure_builtin_dataset("coco_2017_val")

    # Registering again elsewhere (another test, another root) replaces the registration.
    register_builtin_datasets(tmp_path / "other", num_images=counts)
    assert MetadataCatalog.get("dab_shapes_val").json_file.startswith(str(tmp_path / "other"))


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DAB_DETR_DATASETS", str(tmp_path))
    assert builtin.default_datasets_root() == str(tmp_path)
    monkeypatch.delenv("DAB_DETR_DATASETS")
    assert builtin.default_datasets_root() == os.path.expanduser("~/.cache/dab_detr/datasets")


def test_coco_evaluator_scores_ground_truth_perfectly(tmp_path):
    import torch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    register_builtin_datasets(tmp_path, num_images={"dab_shapes_val": 12})
    ensure_builtin_dataset("dab_shapes_val")
    # use_fast_impl=False: the fast path needs detectron2._C, which may be absent.
    evaluator = COCOEvaluator("dab_shapes_val", tasks=("bbox",), use_fast_impl=False)
    evaluator.reset()
    for d in DatasetCatalog.get("dab_shapes_val"):
        inst = Instances((d["height"], d["width"]))
        xywh = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        inst.pred_boxes = Boxes(
            torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            if len(xywh)
            else torch.zeros(0, 4)
        )
        inst.scores = torch.ones(len(xywh))
        inst.pred_classes = torch.tensor(
            [a["category_id"] for a in d["annotations"]], dtype=torch.int64
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP75"] == pytest.approx(100.0)


def test_objects_stay_at_least_half_visible(monkeypatch):
    drawn = []

    def recording_draw_shape(canvas, spec, color, mask=None):
        drawn.append(builtin.shape_mask(spec, *canvas.shape[:2]))
        return real_draw_shape(canvas, spec, color, mask)

    real_draw_shape = builtin.draw_shape
    monkeypatch.setattr(builtin, "draw_shape", recording_draw_shape)
    overlapped = 0
    for i in range(40):
        drawn.clear()
        _, objects = builtin.render_image(np.random.default_rng([5, i]), 160, 192)
        assert len(objects) == len(drawn)
        for k, mask in enumerate(drawn):
            later = np.any(drawn[k + 1 :], axis=0) if k + 1 < len(drawn) else np.zeros_like(mask)
            assert (mask & ~later).sum() >= 0.5 * mask.sum()
            overlapped += bool((mask & later).any())
    assert overlapped > 0  # overlaps do happen; they are only bounded
