"""This project's DETR and Conditional DETR against transformers' ``DetrForObjectDetection`` and
``ConditionalDetrForObjectDetection`` on the same (random) weights, converted with
``python -m dab_detr.convert --source transformers`` (and ``--source auto``, and
``MODEL.WEIGHTS``): every decoder layer's logits and boxes, in float64, for two differently
sized images batched (padding mask: transformers' ``pixel_mask``).

Two things of transformers' differ from the official code (and so from this project's), and
the test works around them:

- ``auxiliary_loss=True`` changes the network, not only the loss: transformers then feeds each
  decoder layer the *layer-normed* output of the previous one (``hidden_states =
  self.layernorm(hidden_states)`` inside the loop, in both models), where the official DETR
  and Conditional DETR normalise only the copy they predict from. Measured on these weights:
  the first layer agrees as below, the later ones differ by 0.5-1.5 in logits and 0.04-0.2 in
  boxes. The models are therefore built with ``auxiliary_loss=False`` (their default, that of
  the Hub's COCO models), and each earlier layer's predictions are transformers' heads on
  transformers' ``decoder_hidden_states`` through its final norm, as the official code
  predicts them.
- transformers computes the image's sine position encoding in the input's dtype, the official
  code (and this project) in float32: in float64 that alone gives 1e-4 in the logits here.
  transformers' encoding is computed in float32 here too, then cast.

With these, every layer agrees within 1.6e-11 (logits) and 1.3e-12 (boxes), measured: float64
rounding, amplified about a thousandfold by the peaked attention of these weights (which makes
the queries differ; in float32 the models agree within 4e-3 and 4e-4 only). Swapping the q and
k blocks of one encoder layer's packed projection gives 1.4-3 in every layer.
"""

import shutil

import pytest
import torch
from detectron2.modeling import build_model
from test_equivalence_transformers import _images as transformers_test_images

from conftest import config_path, load_cfg
from dab_detr.checkpoint import DabDetrCheckpointer, coco_class_rows, convert_transformers
from dab_detr.convert import main as convert_main
from dab_detr.utils.user_errors import InputValueError

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")  # transformers' default backbone for both models

pytestmark = pytest.mark.usefixtures("one_thread")

# model -> (this project's config, transformers' model and config classes); the configs'
# defaults are the COCO models': 6 + 6 layers, 256 channels, 8 heads, FFN 2048, ReLU, sine
# position encoding (normalised, temperature 10000), 100 (DETR) / 300 queries
MODELS = {
    "DETR": ("COCO-Detection/detr_R_50_500ep.yaml", "DetrForObjectDetection", "DetrConfig"),
    "ConditionalDETR": ("COCO-Detection/conditional_detr_R_50_50ep.yaml",
                        "ConditionalDetrForObjectDetection", "ConditionalDetrConfig"),
}
# float64; measured (module docstring): 1.6e-11 logits, 1.3e-12 boxes
ATOL_LOGITS, ATOL_BOXES = 1e-10, 1e-11

_QK_PROJECTIONS = ("q_proj", "k_proj", "qcontent", "qpos", "kcontent", "kpos",
                   "q_content", "q_pos", "k_content", "k_pos")


def _randomize(hf: torch.nn.Module) -> None:
    """Weights under which queries and boxes differ (transformers' init makes every query
    predict almost the same thing), as in ``test_equivalence_transformers.py``; the layer
    norms' affine parameters too, so that a norm applied once too often or too few shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "layer_norm" in name or "layernorm" in name:
                t.copy_((1 if name.endswith("weight") else 0) + torch.randn(t.shape, generator=g)
                        * 0.1)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif "backbone" in name and name.endswith("weight") and t.dim() == 1:
                # small residual branches keep the image's spatial structure in the features
                low, high = (0.05, 0.15) if ".bn3." in name else (0.8, 1.2)
                t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
            elif name.endswith("query_position_embeddings.weight"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif "bbox_predictor.layers.2" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif "backbone" not in name and t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
                if any(p in name for p in _QK_PROJECTIONS):
                    t.mul_(3)  # peaked attention, so that tokens and queries stay distinct


def _images():
    """The two test images of ``test_equivalence_transformers.py`` (differently sized, with
    large uniform regions), as Detectron2 inputs."""
    return [{"image": i} for i in transformers_test_images()]


def _hf_inputs(model, batched):
    """transformers' inputs: this project's normalised, padded batch and its pixel mask (1 at
    the image, 0 at padding), so that both models see the very same pixels."""
    images = model.preprocess_image(batched)
    return images, images.tensor, (~model.padding_mask(images)).long()


def _center_input_projection(hf, pixels, mask) -> None:
    """An input projection under which the tokens differ: a random backbone's features are
    dominated by a constant and by what differs between the two images, which would make
    every token (and query) of an image alike. The projection drops the direction between the
    images' mean features, centres the result and scales the tokens to unit variance."""
    with torch.no_grad():
        features, valid = hf.model.backbone(pixels, mask)[-1]  # (B, C, h, w), (B, h, w)
        tokens = [f.flatten(1)[:, v.flatten()] for f, v in zip(features, valid)]  # (C, n)
        means = torch.stack([t.mean(1) for t in tokens])  # (B, C)
        between = (means[0] - means[1]) / (means[0] - means[1]).norm()
        proj = hf.model.input_projection
        weight = proj.weight[:, :, 0, 0]
        weight -= (weight @ between)[:, None] * between[None]
        proj.bias.copy_(-weight @ means.mean(0))
        scale = torch.cat([weight @ t + proj.bias[:, None] for t in tokens], 1).std()
        proj.weight /= scale
        proj.bias /= scale


def _position_encoding_in_float32(hf) -> None:
    """transformers' image position encoding computed in float32 and then cast, as the
    official code (and this project) computes it."""
    encoding = hf.model.position_embedding
    forward = encoding.forward
    encoding.forward = lambda shape, device, dtype, mask=None: forward(
        shape, device, torch.float32, mask).to(dtype)


def _build_transformers(name: str, **overrides):
    """transformers' model with random weights, in eval mode."""
    _, model_class, config_class = MODELS[name]
    config = getattr(transformers, config_class)(**{"num_labels": 91, "auxiliary_loss": False,
                                                    **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the backbone's convolutions keep transformers' initialisation
        hf = getattr(transformers, model_class)(config).eval()
    _randomize(hf)
    return hf


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(name, transformers' model, this project's model, folder): transformers' model (random
    weights) saved in ``folder/hf``, converted by ``--source transformers`` to
    ``folder/converted.pth``, which this project's model loads; both in eval mode, float32."""
    name = request.param
    config_name = MODELS[name][0]
    folder = tmp_path_factory.mktemp(name)
    hf = _build_transformers(name)
    model = build_model(load_cfg(config_name)).eval()
    _, pixels, mask = _hf_inputs(model, _images())
    _center_input_projection(hf, pixels, mask)
    hf.save_pretrained(folder / "hf")
    out = folder / "converted.pth"
    convert_main(["--source", "transformers", "--config-file", config_path(config_name),
                  str(folder / "hf"), str(out)])
    # strict: no missing and no unexpected tensors
    model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    yield name, hf, model, folder
    shutil.rmtree(folder, ignore_errors=True)


def _converted(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(actual[k], v), k


def _hf_layers(name, hf, pixels, mask):
    """transformers' logits and boxes of every decoder layer, ``(L, B, NQ, K)`` and
    ``(L, B, NQ, 4)``: the last layer's its own outputs; each earlier one's its heads on its
    ``decoder_hidden_states`` (the decoder's input, each layer's output, the last one normed)
    through the decoder's final norm, as the official code predicts them."""
    ref = hf(pixel_values=pixels, pixel_mask=mask, output_hidden_states=True)
    hidden = ref.decoder_hidden_states
    normed = [hf.model.decoder.layernorm(h) for h in hidden[1:-1]] + [hidden[-1]]
    logits = torch.stack([hf.class_labels_classifier(h) for h in normed])
    boxes = torch.stack([hf.bbox_predictor(h) for h in normed])
    if name == "ConditionalDETR":  # relative to the reference points, as transformers' forward
        from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

        decoder = hf.model.decoder
        reference = decoder.ref_point_head(hf.model.query_position_embeddings.weight).sigmoid()
        boxes[..., :2] += inverse_sigmoid(reference)
    boxes = boxes.sigmoid()
    # the replication of transformers' heads is exact where transformers computes them itself
    assert torch.equal(logits[-1], ref.logits) and torch.equal(boxes[-1], ref.pred_boxes)
    return logits, boxes


def test_same_outputs_as_transformers_in_every_layer(pair):
    name, hf, model, _ = pair
    hf, model = hf.double(), model.double()
    _position_encoding_in_float32(hf)
    try:
        with torch.no_grad():
            images, pixels, mask = _hf_inputs(model, _images())
            ref_logits, ref_boxes = _hf_layers(name, hf, pixels, mask)
            ours = model.forward_predictions(images)
    finally:
        hf.float()
        model.float()
        del hf.model.position_embedding.forward
    logits = torch.stack([a["pred_logits"] for a in ours["aux_outputs"]] + [ours["pred_logits"]])
    boxes = torch.stack([a["pred_boxes"] for a in ours["aux_outputs"]] + [ours["pred_boxes"]])
    assert len(logits) == 6
    # the 91 COCO-id rows (DETR: then "no object") in Detectron2's 80 classes
    rows = torch.as_tensor(coco_class_rows() + ([91] if name == "DETR" else []))
    ref_logits = ref_logits[..., rows]
    # the test is only meaningful if the queries of each image and layer differ, and the
    # layers (measured, standard deviation over the queries: logits 0.14-0.35 (DETR),
    # 0.03-0.14 (Conditional DETR), boxes 0.02-0.07; layers 3 or more apart)
    assert ref_logits.std(2).mean(2).min() > 0.02 and ref_boxes.std(2).mean(2).min() > 0.01
    assert (ref_logits[1:] - ref_logits[:-1]).abs().amax((1, 2, 3)).min() > 1
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL_LOGITS)
    torch.testing.assert_close(boxes, ref_boxes, rtol=0, atol=ATOL_BOXES)


def test_every_way_in_converts_alike(pair, tmp_path):
    """``--source auto``, ``MODEL.WEIGHTS`` (``DabDetrCheckpointer``) and the state dict of
    transformers' model in memory (transformers 5 names its modules otherwise than its files)
    give what ``--source transformers`` gave."""
    name, hf, model, folder = pair
    config_name = MODELS[name][0]
    expected = _converted(folder / "converted.pth")
    convert_main(["--config-file", config_path(config_name), str(folder / "hf"),
                  str(tmp_path / "auto.pth")])
    _assert_same_tensors(_converted(tmp_path / "auto.pth"), expected)

    in_memory = hf.state_dict()
    assert "model.backbone.model.conv1.weight" in in_memory  # not the files' names
    _assert_same_tensors(convert_transformers(in_memory), expected)

    loaded = build_model(load_cfg(config_name)).eval()
    DabDetrCheckpointer(loaded).load(str(folder / "hf"))
    _assert_same_tensors(
        {k: v for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked")},
        {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")},
    )


def test_transformers_own_resnet_backbone(tmp_path):
    """``use_timm_backbone=False``: transformers' ResNetBackbone (``embedder``,
    ``encoder.stages``) gives the same features as the converted Detectron2 ResNet."""
    hf = _build_transformers("DETR", use_timm_backbone=False)
    hf.save_pretrained(tmp_path / "hf")
    config = config_path(MODELS["DETR"][0])
    convert_main(["--config-file", config, str(tmp_path / "hf"), str(tmp_path / "out.pth")])
    model = build_model(load_cfg(MODELS["DETR"][0])).eval()
    model.load_state_dict(_converted(tmp_path / "out.pth"), strict=True)
    hf, model = hf.double(), model.double()
    with torch.no_grad():
        images, pixels, mask = _hf_inputs(model, _images())
        ref = hf.model.backbone(pixels, mask)[-1][0]
        ours = model.backbone(images.tensor)["res5"]
    assert ref.std() > 0.1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_tensors_of_neither_model_are_refused(pair):
    name, hf, _, _ = pair
    sd = hf.state_dict()
    learned = {**sd, "model.position_embedding.row_embeddings.weight": torch.zeros(50, 128)}
    with pytest.raises(InputValueError, match=r"position_embedding\.row_embeddings"):
        convert_transformers(learned)
    # Deformable DETR has DETR's query positions, but neither model's decoder
    deformable = {k: v for k, v in sd.items() if not k.startswith("model.decoder.")}
    with pytest.raises(InputValueError, match="not a transformers DetrForObjectDetection"):
        convert_transformers(deformable)
    # a 92-row DETR head (91 COCO ids, "no object") is not a 92-class head
    if name == "DETR":
        assert convert_transformers(sd, num_classes=80)["class_embed.weight"].shape[0] == 81
        assert convert_transformers(sd, num_classes=None)["class_embed.weight"].shape[0] == 92
        with pytest.raises(InputValueError, match="NUM_CLASSES"):
            convert_transformers(sd, num_classes=92)

