"""Shared test helpers. ``import dab_detr`` first: it prepares Detectron2's import."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dab_detr  # noqa: E402,F401
from dab_detr.config import get_dab_detr_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
# names and shapes of the official checkpoints' parameters (see tests/data/README.md)
REFERENCE = os.path.join(REPO, "tests", "data", "official_dab_detr_state_dict_keys.json")


def config_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, name)


def load_cfg(name: str, *opts: str):
    """A config from ``configs/`` on CPU, without downloading pretrained weights."""
    return get_dab_detr_cfg(config_path(name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                                                *opts])


SHAPES_CONFIG = config_path("quick_schedules/dab_detr_R_18_shapes.yaml")
# A few seconds per iteration at most: a narrow transformer on small images.
SMALL = [
    "MODEL.DAB_DETR.HIDDEN_DIM", "64", "MODEL.DAB_DETR.DIM_FEEDFORWARD", "128",
    "MODEL.DAB_DETR.NHEADS", "4", "MODEL.DAB_DETR.ENC_LAYERS", "1",
    "MODEL.DAB_DETR.DEC_LAYERS", "2", "MODEL.DAB_DETR.NUM_QUERIES", "10",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "INPUT.CROP.ENABLED", "False",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "TEST.VIS_NUM_IMAGES", "0",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "7",
]


def small_cfg(*opts: str):
    """The shapes config made SMALL, without weights."""
    return get_dab_detr_cfg(SHAPES_CONFIG, ["MODEL.WEIGHTS", "", *SMALL, *opts])


def small_model(*opts: str) -> torch.nn.Module:
    from detectron2.modeling import build_model

    return build_model(small_cfg(*opts))


def losses_by_iteration(trainer) -> dict:
    """``{iteration: total_loss}`` of a finished run."""
    return {it: v for v, it in trainer.storage.history("total_loss").values()}


def write_coco_dataset(root: str, split: str, num_images: int, seed: int) -> str:
    """Write ``num_images`` 128 x 96 images with 1-3 filled rectangles each (5 classes) to
    ``root/split/`` and their COCO json to ``root/split.json``; returns the json's path.
    All images have one size, so that any split of a batch is padded like the batch."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        pixels = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(16, 48, 2)
            x, y = rng.integers(0, 128 - w), rng.integers(0, 96 - h)
            cls = int(rng.integers(0, 5))
            pixels[y : y + h, x : x + w] = 80 + 40 * cls
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0,
                                "category_id": cls + 1, "bbox": [int(x), int(y), int(w), int(h)],
                                "area": int(w * h)})
        name = f"{i:03d}.png"
        Image.fromarray(pixels).save(os.path.join(root, split, name))
        images.append({"id": i + 1, "file_name": name, "width": 128, "height": 96})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(5)]
    json_file = os.path.join(root, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _dab_detr_logs_reach_caplog(monkeypatch):
    """train_net's setup gives the ``dab_detr`` logger its own handlers (Detectron2's
    ``setup_logger``), which stops propagation to the root logger that ``caplog`` listens to:
    let it propagate in tests."""
    import train_net

    def setup_logger(*args, **kwargs):
        logger = detectron2_setup_logger(*args, **kwargs)
        logger.propagate = True
        return logger

    detectron2_setup_logger = train_net.setup_logger
    monkeypatch.setattr(train_net, "setup_logger", setup_logger)
    monkeypatch.setattr(logging.getLogger("dab_detr"), "propagate", True)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread, then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
