"""Built-in synthetic detection dataset ``dab_shapes``, generated deterministically on first use.

Lets a newcomer without COCO train and evaluate DAB-DETR on a CPU in minutes with Detectron2's
trainer and ``COCOEvaluator``. Images hold 0..6 filled shapes of five classes in random colours,
sizes and aspect ratios on textured, noisy backgrounds; boxes are the tight (amodal) boxes of
the drawn shapes, so box precision matters at IoU 0.75.

Usage: call :func:`register_builtin_datasets` once (cheap, generates nothing), then use
``dab_shapes_train`` / ``dab_shapes_val`` in ``cfg.DATASETS``. A split is written to
``<root>/dab_shapes_<version>/`` the first time ``DatasetCatalog.get`` asks for it.
``COCOEvaluator`` reads the metadata's ``json_file`` when it is built, so train_net calls
:func:`ensure_builtin_dataset` for every built-in test set before building evaluators.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, ImageDraw

from ..utils.file_io import atomic_write

logger = logging.getLogger(__name__)

# Bump whenever the generator's output changes, so stale caches are never reused.
DATASET_VERSION = "v1"
CLASS_NAMES = ("ellipse", "rectangle", "triangle", "ring", "cross")
# dataset name -> (split, num_images, seed); distinct seeds keep val disjoint from train.
BUILTIN_DATASETS = {"dab_shapes_train": ("train", 800, 0), "dab_shapes_val": ("val", 120, 1)}
_SIDE_STEPS = (0, 32, 64)  # per-image sides are max_side minus one of these: padding gets used
_SIZE_RANGE = (0.08, 0.6)  # object side as a fraction of the image's shorter side
_ASPECT_RANGE = (0.5, 2.0)
_MIN_SIDE = 10  # below this a ring's hole or a cross's arms stop being recognisable
_MAX_OBJECTS = 6
_EMPTY_FRACTION = 0.1
_MAX_COVERED = 0.5
_MIN_CONTRAST = 100.0  # RGB distance between a shape and what it is drawn over
_registered: dict[str, dict[str, Any]] = {}  # name -> generate_shapes_dataset kwargs


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its class, integer box ``(x0, y0, x1, y1)`` with inclusive ends, and
    ``param`` (ring thickness / cross arm width as a fraction, triangle apex position) and
    ``orientation`` (the box side, 0..3, that holds a triangle's apex)."""

    category_id: int  # COCO id, 1-based
    box: tuple[int, int, int, int]
    param: float = 0.5
    orientation: int = 0


def sample_shape(rng: np.random.Generator, img_h: int, img_w: int) -> ShapeSpec:
    """Draw a random shape that fits inside an ``img_h`` x ``img_w`` image.

    Args:
        rng: source of randomness. img_h, img_w: image size in pixels.

    Returns:
        The sampled :class:`ShapeSpec`.
    """
    cat = int(rng.integers(1, len(CLASS_NAMES) + 1))
    # Log-uniform size and aspect: small objects are as common as large ones.
    side = min(img_h, img_w) * np.exp(rng.uniform(*np.log(_SIZE_RANGE)))
    aspect = np.exp(rng.uniform(*np.log(_ASPECT_RANGE)))
    w = int(np.clip(round(side * np.sqrt(aspect)), _MIN_SIDE, int(0.95 * img_w)))
    h = int(np.clip(round(side / np.sqrt(aspect)), _MIN_SIDE, int(0.95 * img_h)))
    x0, y0 = int(rng.integers(0, img_w - w + 1)), int(rng.integers(0, img_h - h + 1))
    name = CLASS_NAMES[cat - 1]
    param = {"ring": (0.2, 0.45), "cross": (0.25, 0.4)}.get(name, (0.0, 1.0))
    return ShapeSpec(
        cat, (x0, y0, x0 + w - 1, y0 + h - 1), float(rng.uniform(*param)), int(rng.integers(0, 4))
    )


def shape_mask(spec: ShapeSpec, img_h: int, img_w: int) -> np.ndarray:
    """Rasterise a shape with PIL, the same way the generator draws it.

    Args:
        spec: the shape. img_h, img_w: image size in pixels.

    Returns:
        Boolean mask of shape ``(img_h, img_w)``.
    """
    im = Image.new("L", (img_w, img_h), 0)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = spec.box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    name = CLASS_NAMES[spec.category_id - 1]
    if name in ("ellipse", "ring"):
        draw.ellipse(spec.box, fill=255)
        if name == "ring":
            t = max(2, round(spec.param * min(w, h) / 2))
            draw.ellipse((x0 + t, y0 + t, x1 - t, y1 - t), fill=0)
    elif name == "rectangle":
        draw.rectangle(spec.box, fill=255)
    elif name == "cross":
        aw, ah = max(2, round(spec.param * w)), max(2, round(spec.param * h))
        ax, ay = x0 + (w - aw) // 2, y0 + (h - ah) // 2
        draw.rectangle((ax, y0, ax + aw - 1, y1), fill=255)
        draw.rectangle((x0, ay, x1, ay + ah - 1), fill=255)
    else:  # triangle: apex on one side of the box, base along the opposite side
        ax, ay = round(x0 + spec.param * (w - 1)), round(y0 + spec.param * (h - 1))
        apex = [(ax, y0), (x1, ay), (ax, y1), (x0, ay)][spec.orientation]
        base = [(x0, y1, x1, y1), (x0, y0, x0, y1), (x0, y0, x1, y0), (x1, y0, x1, y1)]
        bx0, by0, bx1, by1 = base[spec.orientation]
        draw.polygon([apex, (bx0, by0), (bx1, by1)], fill=255)
    return np.asarray(im) > 0


def draw_shape(
    canvas: np.ndarray, spec: ShapeSpec, color: np.ndarray, mask: np.ndarray | None = None
) -> list[float]:
    """Paint a shape into ``canvas`` (H, W, 3) in place and return its annotation box.

    Args:
        canvas: float image to paint into. spec: the shape. color: RGB fill colour.
        mask: the shape's mask, if already computed by :func:`shape_mask`.

    Returns:
        The tight box ``[x, y, w, h]`` (COCO XYWH, pixel edges) of the painted pixels.
    """
    if mask is None:
        mask = shape_mask(spec, *canvas.shape[:2])
    canvas[mask] = color
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1.0 - x0, float(ys.max()) + 1.0 - y0]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random gradient, sometimes with faint stripes and colour blobs, as float32."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    bg = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.5:
        phi, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        phase = (xx * np.cos(phi) + yy * np.sin(phi)) * (2 * np.pi / period)
        bg += rng.uniform(5, 20) * np.sin(phase + rng.uniform(0, 2 * np.pi))[..., None]
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(2, 7))):
            cy, cx, sigma = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * w
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            bg += blob[..., None] * rng.uniform(-50, 50, size=3).astype(np.float32)
    return bg


def _pick_color(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Random colour that stands out from what the shape covers (else the best of 20 tries)."""
    colors = rng.uniform(0, 255, size=(20, 3)).astype(np.float32)
    dist = np.linalg.norm(colors - canvas[mask].mean(axis=0), axis=1)
    ok = np.flatnonzero(dist >= _MIN_CONTRAST)
    return colors[ok[0] if len(ok) else int(dist.argmax())]


def render_image(
    rng: np.random.Generator, img_h: int, img_w: int
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Render one image and its ground truth.

    Args:
        rng: the only source of randomness. img_h, img_w: image size in pixels.

    Returns:
        ``(image, objects)``: uint8 RGB array and a list of ``(category_id, [x, y, w, h])``.
    """
    canvas = _background(rng, img_h, img_w)
    n = 0 if rng.random() < _EMPTY_FRACTION else int(rng.integers(1, _MAX_OBJECTS + 1))
    owner = np.full((img_h, img_w), -1, dtype=np.int32)  # index of the topmost object
    areas: list[int] = []
    objects: list[tuple[int, list[float]]] = []
    for _ in range(n):
        for _attempt in range(10):
            spec = sample_shape(rng, img_h, img_w)
            mask = shape_mask(spec, img_h, img_w)
            # Reject a shape that would hide too much of an earlier one: GT must stay visible.
            visible = np.bincount(owner[owner >= 0], minlength=len(areas))
            lost = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
            if np.all(visible - lost >= (1.0 - _MAX_COVERED) * np.asarray(areas)):
                break
        else:
            continue  # this image simply gets fewer objects
        box = draw_shape(canvas, spec, _pick_color(rng, canvas, mask), mask)
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        objects.append((spec.category_id, box))
    canvas += rng.normal(0.0, rng.uniform(2, 10), size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def generate_shapes_dataset(
    root: str, split: str, num_images: int, seed: int, image_size: tuple[int, int] = (224, 224)
) -> str:
    """Write ``root/<split>/*.png`` and ``root/annotations/<split>.json`` (COCO format).

    A cache: does nothing when the json exists and was made with the same arguments and
    :data:`DATASET_VERSION`. The json is written last and atomically, so its presence means
    the split is complete. Output is byte-identical across runs for the same arguments.

    Args:
        root: dataset directory.
        split: split name, e.g. ``"train"``.
        num_images: number of images.
        seed: seed; image ``i`` uses ``numpy.random.default_rng([seed, i])``.
        image_size: largest ``(H, W)``; each side is drawn from it minus 0, 32 or 64 pixels.

    Returns:
        Path of the annotation json.
    """
    json_path = os.path.join(root, "annotations", f"{split}.json")
    info = {"description": "dab_shapes", "version": DATASET_VERSION, "split": split}
    info.update(num_images=num_images, seed=seed, image_size=list(image_size))
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            if json.load(f).get("info") == info:
                return json_path
        logger.warning("%s was made with other settings; regenerating it.", json_path)
    start = time.perf_counter()
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    images, annotations = _write_images(os.path.join(root, split), num_images, seed, image_size)
    data = {"info": info, "licenses": [], "images": images, "annotations": annotations}
    data["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    # written last: its presence marks the split complete
    atomic_write(json_path, json.dumps(data).encode("utf-8"), fsync=False)
    elapsed = time.perf_counter() - start
    logger.info("Generated %s (%d images) in %.1f s.", json_path, num_images, elapsed)
    return json_path


def _write_images(
    image_dir: str, num_images: int, seed: int, image_size: tuple[int, int]
) -> tuple[list[dict], list[dict]]:
    """Render and save every image of a split; return COCO ``images`` and ``annotations``."""
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])  # per image: any image can be rebuilt alone
        h, w = (max(s // 2, s - int(rng.choice(_SIDE_STEPS))) for s in image_size)
        pixels, objects = render_image(rng, h, w)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        atomic_write(os.path.join(image_dir, f"{i:06d}.png"), buf.getvalue(), fsync=False)
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": h, "width": w})
        for cat, box in objects:
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "bbox": box}
            annotations.append({**ann, "area": box[2] * box[3], "iscrowd": 0})
    return images, annotations


def default_datasets_root() -> str:
    """Return ``$DAB_DETR_DATASETS`` if set, else ``~/.cache/dab_detr/datasets``."""
    return os.environ.get("DAB_DETR_DATASETS") or os.path.expanduser("~/.cache/dab_detr/datasets")


def register_builtin_datasets(
    root: str | os.PathLike | None = None, num_images: Mapping[str, int] | None = None
) -> list[str]:
    """Register ``dab_shapes_train`` and ``dab_shapes_val`` lazily; generates nothing.

    Safe to call again: same settings are a no-op, other settings re-register the names.

    Args:
        root: datasets root (default :func:`default_datasets_root`); data goes to
            ``<root>/dab_shapes_<version>/``.
        num_images: per-name image counts overriding :data:`BUILTIN_DATASETS` (for tests).

    Returns:
        The registered dataset names.
    """
    dataset_dir = os.path.join(
        os.fspath(root or default_datasets_root()), f"dab_shapes_{DATASET_VERSION}"
    )
    for name, (split, count, seed) in BUILTIN_DATASETS.items():
        count = (num_images or {}).get(name, count)
        kwargs = {"root": dataset_dir, "split": split, "num_images": count, "seed": seed}
        if name in DatasetCatalog.list():
            if _registered.get(name) == kwargs:
                continue
            logger.info("Re-registering %s with data in %s.", name, dataset_dir)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        _registered[name] = kwargs
        DatasetCatalog.register(name, functools.partial(_load_split, name, kwargs))
        # The fields register_coco_instances sets, plus those load_coco_json would add later:
        # models and evaluators may need them before the split is ever loaded.
        MetadataCatalog.get(name).set(
            json_file=os.path.join(dataset_dir, "annotations", f"{split}.json"),
            image_root=os.path.join(dataset_dir, split),
            evaluator_type="coco",
            thing_classes=list(CLASS_NAMES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
        )
    return list(BUILTIN_DATASETS)


def _load_split(name: str, kwargs: dict[str, Any]) -> list[dict]:
    """DatasetCatalog function of a built-in split: generate it if missing, then load it."""
    json_file = generate_shapes_dataset(**kwargs)
    return load_coco_json(json_file, os.path.join(kwargs["root"], kwargs["split"]), name)


def ensure_builtin_dataset(name: str) -> str:
    """Generate a built-in split if missing; registers with defaults if nobody has.

    Args:
        name: a key of :data:`BUILTIN_DATASETS`.

    Returns:
        Path of the split's annotation json (the metadata's ``json_file``).
    """
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"{name!r} is not a built-in dataset: {sorted(BUILTIN_DATASETS)}")
    if name not in _registered:
        register_builtin_datasets()
    return generate_shapes_dataset(**_registered[name])
