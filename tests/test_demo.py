"""demo/demo.py with a random-weights shapes model: pictures the size of their inputs, for a
file, a folder and a glob, and the JSON of the detections."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from conftest import REPO, config_path, load_cfg
from dab_detr.data import CLASS_NAMES

SHAPES = config_path("quick_schedules/dab_detr_R_18_shapes.yaml")
DEFORMABLE_SHAPES = config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml")
DETR_SHAPES = config_path("quick_schedules/detr_R_18_shapes.yaml")
CONDITIONAL_DETR_SHAPES = config_path("quick_schedules/conditional_detr_R_18_shapes.yaml")
DINO_SHAPES = config_path("quick_schedules/dino_R_18_shapes.yaml")


def _load_demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "demo", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _image(path, size, seed: int = 0) -> str:
    """A random RGB image of ``size`` (w, h) saved to ``path``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _run(*args: str, weights: str = "", config: str = SHAPES):
    return demo.main(["--config-file", config, *args, "--opts", "MODEL.WEIGHTS", weights,
                      "MODEL.DEVICE", "cpu"])


@pytest.mark.parametrize(
    "config, num_select",
    [(SHAPES, 100), (DEFORMABLE_SHAPES, 100), (DETR_SHAPES, 30), (CONDITIONAL_DETR_SHAPES, 100),
     (DINO_SHAPES, 100)],
    ids=["dab_detr", "deformable", "detr", "conditional_detr", "dino"],
)
def test_single_image_to_file_and_json(tmp_path, config, num_select):
    src = _image(tmp_path / "in.jpg", (150, 110))
    out, js = tmp_path / "vis" / "out.png", tmp_path / "det.json"
    _run("--input", src, "--output", str(out), "--json", str(js),
         "--confidence-threshold", "0", config=config)
    with Image.open(out) as picture:
        assert picture.size == (150, 110)
    records = json.loads(js.read_text())
    assert [(r["file_name"], r["height"], r["width"]) for r in records] == [(src, 110, 150)]
    detections = records[0]["detections"]
    assert len(detections) == num_select  # NUM_SELECT, all kept at threshold 0
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        x0, y0, x1, y1 = d["bbox"]
        assert 0 <= x0 <= x1 <= 150 and 0 <= y0 <= y1 <= 110
        assert d["category"] == CLASS_NAMES[d["category_id"]]


def test_folder_and_glob_to_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"a.png": (96, 64), "b.jpg": (120, 200)}
    for i, (name, size) in enumerate(sizes.items()):
        _image(folder / name, size, seed=i)
    (folder / "notes.txt").write_text("not an image")
    other = tmp_path / "other"
    other.mkdir()
    _image(other / "a.png", (80, 80), seed=5)  # same name as an image of the folder
    out = tmp_path / "out"
    records = _run("--input", str(folder), str(other / "*.png"), "--output", str(out),
                   "--confidence-threshold", "0.3")
    assert [os.path.basename(r["file_name"]) for r in records] == ["a.png", "b.jpg", "a.png"]
    expected = {"a.png": (96, 64), "b.jpg": (120, 200), "a_1.png": (80, 80)}
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, size in expected.items():
        with Image.open(out / name) as picture:
            assert picture.size == size
    for r in records:
        assert all(d["score"] >= 0.3 for d in r["detections"])


def test_weights_are_loaded(tmp_path):
    """A checkpoint whose class head says "triangle" for every query: with it loaded, each of
    the 30 queries gives one confident triangle (random weights give scores near 0.01)."""
    model = build_model(load_cfg("quick_schedules/dab_detr_R_18_shapes.yaml"))
    with torch.no_grad():
        model.class_embed.bias[CLASS_NAMES.index("triangle")] = 10.0
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    src = _image(tmp_path / "in.png", (100, 90))
    records = _run("--input", src, "--output", str(tmp_path / "out"), weights=str(weights))
    detections = records[0]["detections"]
    assert len(detections) == 30
    assert {d["category"] for d in detections} == {"triangle"}


def test_input_matching_nothing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no image"):
        demo.expand_inputs([str(tmp_path / "*.jpg")])
