"""This project's DAB-DETR against the official implementation (IDEA-Research/DAB-DETR): the
outputs of every decoder layer, for weights rebuilt by the rule of the reference data (see
``official_reference.py``) and converted as a user would, with
``python -m dab_detr.convert --source official --config-file ...``.

The model runs in float64, as the reference did. The official class head has 91 rows, one per
COCO category id; to compare every logit, the model is built with ``NUM_CLASSES 91`` (a config
deriving from ``dab_detr_R_50_50ep.yaml``), for which the converter keeps all 91 rows.
``test_coco_config_keeps_the_80_coco_rows`` checks that the stock 80-class config gets the same
weights with the class head reduced to Detectron2's 80 classes.

Shapes: L decoder layers, B batch, Q queries, K = 91 classes.
"""

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import pytest
import torch
from detectron2.modeling import build_model

from conftest import config_path
from dab_detr.checkpoint import coco_class_rows
from dab_detr.config import get_dab_detr_cfg
from dab_detr.convert import main as convert_main
from official_reference import (
    REFERENCE_DIR,
    load_images,
    load_outputs,
    official_state_dict,
    stack_layers,
)

MODEL = "dab_detr_r50"
CONFIG = config_path("COCO-Detection/dab_detr_R_50_50ep.yaml")
# run -> images, batched in this order (the reference's three runs)
RUNS = {"batch": ("image0", "image1"), "image0": ("image0",), "image1": ("image1",)}
# (logits (L, B, Q, K), boxes (L, B, Q, 4)) of every decoder layer, first layer first
Prediction = Tuple[torch.Tensor, torch.Tensor]
# What the official models take: (x / 255 - mean) / std, in RGB.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
# Measured, in every layer and run: at most 1.3e-7 on the logits (|logit| < 3.5) and 3.4e-8 on
# the boxes, hardly more than the float32 rounding of the stored reference (83% of the logits
# round to the same float32; no difference exceeds half a float32 step by more than 2.6e-8).
# Tighter than float32 computing: the same model in float32 misses by 2.6e-6 and 6.6e-7.
LOGITS_TOL = dict(rtol=0.0, atol=5e-7)
BOXES_TOL = dict(rtol=0.0, atol=1e-7)


def _convert(workdir: Path, config_file: str, name: str) -> dict:
    """Rebuild the official weights (once per module), save them in the release format, and
    convert them with the command-line converter for ``config_file`` into ``name``; return
    what the converter wrote."""
    source, target = workdir / "official.pth", workdir / name
    if not source.exists():
        sd = official_state_dict(os.path.join(REFERENCE_DIR, f"{MODEL}.json"))
        torch.save({"model": sd}, source)
    convert_main(["--source", "official", "--config-file", config_file, str(source),
                  str(target)])
    return torch.load(target, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    """A folder for the module's weight files, removed afterwards: each is ~350 MB in float64."""
    path = tmp_path_factory.mktemp("official")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def config_91(workdir: Path) -> str:
    """The R50 COCO config with the official 91-row class head (COCO ids, 0 included)."""
    path = workdir / "dab_detr_R_50_91_classes.yaml"
    path.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  DAB_DETR:\n    NUM_CLASSES: 91\n')
    return str(path)


@pytest.fixture(scope="module")
def converted(workdir: Path, config_91: str) -> Dict[str, torch.Tensor]:
    return _convert(workdir, config_91, "converted_91.pth")["model"]


@pytest.fixture(scope="module")
def model(config_91: str, converted: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The project's model with the converted official weights, in float64, eval mode."""
    cfg = get_dab_detr_cfg(config_91, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    # the config is the official preprocessing: RGB, ImageNet mean and std in 0-255 units
    assert cfg.INPUT.FORMAT == "RGB"
    # float64 before loading: loading into float32 parameters would round the weights
    model = build_model(cfg).double().eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected, unexpected
    # BatchNorm's step counter is the only tensor no source has (the R50 has none at all)
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {
        torch.float64
    }
    return model


@pytest.fixture(scope="module")
def images() -> Dict[str, torch.Tensor]:
    return load_images(os.path.join(REFERENCE_DIR, "images.npz"))


@pytest.fixture(scope="module")
def predict(
    model: torch.nn.Module, images: Dict[str, torch.Tensor]
) -> Callable[[str], Prediction]:
    """``predict(run)`` -> ``(logits (L, B, Q, K), boxes (L, B, Q, 4))`` of the project's
    model, every decoder layer, first layer first; each run computed once."""
    cache: Dict[str, Prediction] = {}

    def run(name: str) -> Prediction:
        if name not in cache:
            with torch.no_grad():
                batch = model.preprocess_image([{"image": images[k]} for k in RUNS[name]])
                outputs = model.forward_predictions(batch, with_aux=True)
            cache[name] = stack_layers(outputs, "pred_logits"), stack_layers(outputs, "pred_boxes")
        return cache[name]

    return run


def _reference(run: str) -> Dict[str, torch.Tensor]:
    ref = load_outputs(os.path.join(REFERENCE_DIR, f"{MODEL}_outputs.npz"), run)
    return {k: v.double() for k, v in ref.items()}


def _assert_layers_close(ours: torch.Tensor, ref: torch.Tensor, what: str, **tol) -> None:
    """Layer by layer, first layer first, so that a failure names the first that diverges."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    for layer in range(ref.shape[0]):
        torch.testing.assert_close(ours[layer], ref[layer], **tol,
                                   msg=lambda m, layer=layer: f"{what}, decoder layer {layer}: {m}")


def test_same_input_as_official(model, images):
    """The model's normalised, zero-padded batch is the official input tensor. Up to 7e-8:
    the model keeps PIXEL_MEAN and PIXEL_STD in float32 buffers (123.675 is 123.67500305...),
    which ``model.double()`` widens but cannot make exact; the outputs agree no better with
    exact constants (measured), so the reference was likely normalised in float32 too."""
    batch = model.preprocess_image([{"image": images[k]} for k in RUNS["batch"]])
    expected = torch.zeros(2, 3, 256, 320, dtype=torch.float64)
    for i, k in enumerate(RUNS["batch"]):
        h, w = images[k].shape[1:]
        expected[i, :, :h, :w] = (images[k].double() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert batch.image_sizes == [(256, 320), (224, 288)]
    torch.testing.assert_close(batch.tensor, expected, rtol=0, atol=2e-7)


@pytest.mark.parametrize("run", list(RUNS))
def test_every_decoder_layer_matches_official(predict, run):
    """All 6 layers, all 300 queries, all 91 classes, and the boxes."""
    ref = _reference(run)
    logits, boxes = predict(run)
    # the comparison means something only if queries and classes differ
    assert ref["logits"].std() > 0.5 and ref["boxes"].std() > 0.1
    assert logits.shape == (6, len(RUNS[run]), 300, 91)
    _assert_layers_close(logits, ref["logits"], f"{run} logits", **LOGITS_TOL)
    _assert_layers_close(boxes, ref["boxes"], f"{run} boxes", **BOXES_TOL)


def test_padded_image_matches_official_batch(predict):
    """image1 is zero-padded in the batch, which changes the backbone's features near its
    bottom and right borders: its batched outputs are the official batched ones, not those of
    image1 alone (the official code masks the padding in attention, but not in the ResNet)."""
    batched, alone = _reference("batch"), _reference("image1")
    # the padding changes the official outputs, so this checks how it is handled
    assert (batched["logits"][:, 1] - alone["logits"][:, 0]).abs().max() > 0.01
    logits, boxes = predict("batch")
    _assert_layers_close(logits[:, 1], batched["logits"][:, 1], "padded image1 logits",
                         **LOGITS_TOL)
    _assert_layers_close(boxes[:, 1], batched["boxes"][:, 1], "padded image1 boxes", **BOXES_TOL)
    # image0 fills the batch: no padding, the same outputs as alone
    torch.testing.assert_close(logits[:, 0:1], predict("image0")[0], rtol=0, atol=1e-12)


def test_coco_config_keeps_the_80_coco_rows(workdir, converted):
    """The stock 80-class config gets the same weights, its class head the rows of the 80 COCO
    categories in Detectron2's order: its logits are the official ones at those ids."""
    sd = _convert(workdir, CONFIG, "converted_80.pth")["model"]
    assert sd.keys() == converted.keys()
    rows = torch.as_tensor(coco_class_rows())
    for k, v in converted.items():
        expected = v[rows] if k.startswith("class_embed.") else v
        torch.testing.assert_close(sd[k], expected, rtol=0, atol=0, msg=k)
