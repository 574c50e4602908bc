"""DAT equals the official code (LeapLabTHU/DAT, tag CVPR2022) in float64, stage by stage.

``tests/data/dat_outputs`` holds what the official DAT-T and DAT-S computed on CPU in float64
for weights made by the rule of its README, at 224x224 and at 224x448 (the official model
built for that size, its position-bias tables resized by ``DAT.load_pretrained``). Here the
same weights are rebuilt, saved as the official code saves them, converted by
``python -m dab_detr.convert --source dat``'s converter, and run by this project's DAT: every
stage (before the detection LayerNorms, and through them), and the ImageNet logits through a
classifier built for the test.

Shapes: C_s channels and H_s x W_s map of stage s (strides 4 to 32).
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dab_detr.checkpoint.dat import convert_dat, dat_classifier
from dab_detr.layers.window_attention import WindowPositionBias, shifted_window_mask
from dab_detr.modeling.dat import DAT, DAT_SIZES
from official_reference import load_images, official_state_dict

DAT_REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                 "dat_outputs")
MODELS = {"T": "dat_tiny", "S": "dat_small"}
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
# float32 storage of values up to 22 rounds by 1.3e-6; the README suggests about 1e-5
TOL = dict(rtol=0, atol=1e-5)


def _keep(entry: dict) -> torch.Tensor:
    """The size-derived buffers of a release file: the window index, and the 224 model's
    shifted-window masks of stage 0 (56x56 map) and 1 (28x28)."""
    if entry["key"].endswith("relative_position_index"):
        return WindowPositionBias(7, 1).index.clone()
    side = 56 // 2 ** int(entry["key"].split(".")[1])
    return shifted_window_mask((side, side), 7, 4)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_reference(request, tmp_path_factory):
    name = MODELS[request.param]
    sd = official_state_dict(os.path.join(DAT_REFERENCE_DIR, f"{name}.json"), keep=_keep)
    path = tmp_path_factory.mktemp("dat") / f"{name}.pth"
    torch.save({"model": sd}, path)  # as the official utils.save_checkpoint writes it
    loaded = torch.load(path, weights_only=True)["model"]
    converted = convert_dat(loaded)
    model = DAT(size=DAT_SIZES[request.param], out_indices=(0, 1, 2, 3)).double().eval()
    weights = {k.removeprefix("backbone.body."): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # the detection LayerNorms are not in an ImageNet file: they start as weight 1, bias 0
    assert sorted(missing) == [f"out_norms.{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert unexpected == []
    classifier = dat_classifier(loaded)
    with np.load(os.path.join(DAT_REFERENCE_DIR, f"{name}_outputs.npz")) as data:
        reference = {k: torch.from_numpy(data[k]).double() for k in data.files}
    return model, classifier, reference


def _pixels(image: torch.Tensor) -> torch.Tensor:
    return ((image.double() / 255 - MEAN) / STD)[None]


@pytest.mark.parametrize("image", ["image0", "image1"])  # 224x224, 224x448
def test_every_stage_and_the_logits_equal_the_official_model(model_and_reference, image):
    model, classifier, reference = model_and_reference
    pixels = _pixels(load_images(os.path.join(DAT_REFERENCE_DIR, "images.npz"))[image])
    with torch.no_grad():
        stages = model.stage_outputs(pixels)
        features = model(pixels)
    for s, out in enumerate(stages):
        expected = reference[f"{image}_stage{s}"]  # (1, C_s, H_s, W_s)
        torch.testing.assert_close(out.permute(0, 3, 1, 2), expected, **TOL,
                                   msg=lambda m, s=s: f"stage {s}: {m}")
        # the backbone's output: the official stage through a fresh LayerNorm over channels
        normed = F.layer_norm(expected.permute(0, 2, 3, 1), expected.shape[1:2])
        torch.testing.assert_close(features[s], normed.permute(0, 3, 1, 2), **TOL)
    pooled = F.layer_norm(stages[3], stages[3].shape[-1:], classifier["norm.weight"],
                          classifier["norm.bias"]).mean(dim=(1, 2))
    logits = F.linear(pooled, classifier["head.weight"], classifier["head.bias"])
    torch.testing.assert_close(logits, reference[f"{image}_logits"], **TOL)


def test_reading_the_224_tables_unresized_would_differ(model_and_reference, monkeypatch):
    """At 224x448 the tables must be resized as the official ``load_pretrained`` does: read
    directly (at the same normalised displacements) stage 3 differs by about 0.08."""
    import dab_detr.layers.relative_position as relative_position

    model, _, reference = model_and_reference
    monkeypatch.setattr(relative_position, "resize_displacement_table", lambda table, size: table)
    pixels = _pixels(load_images(os.path.join(DAT_REFERENCE_DIR, "images.npz"))["image1"])
    with torch.no_grad():
        stage2 = model.stage_outputs(pixels, until=2)[2]
    error = (stage2.permute(0, 3, 1, 2) - reference["image1_stage2"]).abs().max()
    assert error > 0.01
