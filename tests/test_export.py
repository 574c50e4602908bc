"""ONNX export (``dab_detr.export``): every family (DAB-DETR, DAB-Deformable-DETR, DETR,
Conditional DETR, DINO) exported at one size and run by onnxruntime on a padded batch of two
other sizes (a DAT backbone: single images), against PyTorch's ``model.inference``; the export-exact
padding-mask resize; errors that name what cannot be exported.

Shapes: B batch, S detections per image.
"""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from conftest import SMALL, config_path
from dab_detr.config import get_dab_detr_cfg
from dab_detr.export import (
    ExportableDetector,
    ExportError,
    check_exportable,
    export_onnx,
    match_detections,
    pytorch_detections,
    require,
    run_onnxruntime,
)
from dab_detr.export.__main__ import main
from dab_detr.modeling.meta_arch.base import resize_padding_mask

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SCORE_TOL, BOX_TOL = 1e-4, 1e-3  # box coordinates in pixels
EXPORT_SIZE = (96, 128)
# Two sizes other than the export's, batched into 112 x 150. At stride 16 the 150 columns give
# 10, and the second image's 120 columns end exactly on feature column 8 (8 * 15): where ONNX's
# Resize, were it used for the padding mask, would find 8 / (10 / 150) = 119.99999 and unmask
# that column (F.interpolate finds 8 * 15 = 120, padding).
BATCH = [(112, 150), (77, 120)]
# SMALL keeps 10 queries x 5 classes; selecting 20 of the 50 makes the top-k cut.
OPTS = [*SMALL, "MODEL.DAB_DETR.NUM_SELECT", "20"]
DAB_DETR = config_path("quick_schedules/dab_detr_R_18_shapes.yaml")
DEFORMABLE = config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml")
DETR = config_path("quick_schedules/detr_R_18_shapes.yaml")
CONDITIONAL_DETR = config_path("quick_schedules/conditional_detr_R_18_shapes.yaml")
DINO = config_path("quick_schedules/dino_R_18_shapes.yaml")
DAT = config_path("quick_schedules/dab_deformable_detr_DAT_shapes.yaml")
def _model(config_file: str) -> torch.nn.Module:
    """A small random model whose heads and deformable attentions are moved off their
    initialisation, so that boxes and sampling depend on the image."""
    model = build_model(get_dab_detr_cfg(config_file, ["MODEL.WEIGHTS", "", *OPTS])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bbox_embed" in name or "class_embed" in name or "sampling_offsets" in name:
                p.normal_(0, 0.1)
    return model


def _batch(model: torch.nn.Module):
    gen = torch.Generator().manual_seed(1)
    return model.preprocess_image(
        [{"image": torch.rand(3, h, w, generator=gen) * 255} for h, w in BATCH]
    )


def _assert_same_detections(expected, actual) -> None:
    """onnxruntime's detections are PyTorch's in PyTorch's order, up to ties: a detection
    matched at another position scores within the tolerance of the one at its position, and
    one that only PyTorch's top-k kept ties with onnxruntime's last score."""
    index = match_detections(expected, actual, SCORE_TOL)  # (B, S) into actual
    kept = index >= 0
    last = actual[0][:, -1:].expand_as(expected[0])
    torch.testing.assert_close(expected[0][~kept], last[~kept], atol=SCORE_TOL, rtol=0)
    at = index.clamp(min=0)
    scores, classes = actual[0].gather(1, at), actual[1].gather(1, at)
    boxes = actual[2].gather(1, at[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(scores[kept], expected[0][kept], atol=SCORE_TOL, rtol=0)
    torch.testing.assert_close(classes[kept], expected[1][kept], atol=0, rtol=0)
    torch.testing.assert_close(boxes[kept], expected[2][kept], atol=BOX_TOL, rtol=0)
    # ties only: where the order differs, the scores at each position still agree
    torch.testing.assert_close(actual[0], expected[0], atol=SCORE_TOL, rtol=0)


def _export_by_command_line(folder, config_file: str):
    """The model of ``config_file`` exported by the command line (with its check), from a
    weight file."""
    model = _model(config_file)
    weights, path = str(folder / "model.pth"), str(folder / "model.onnx")
    torch.save({"model": model.state_dict()}, weights)
    try:
        main(["--config-file", config_file, "--output", path, "--example-size",
              *map(str, EXPORT_SIZE), "--opts", "MODEL.WEIGHTS", weights, *OPTS])
    except SystemExit as e:  # the command's refusal; pytest caches a fixture's Exception only
        raise ExportError(e.code) from e
    return model, path


@pytest.fixture(scope="module")
def dab_detr_onnx(tmp_path_factory):
    return _export_by_command_line(tmp_path_factory.mktemp("dab_detr"), DAB_DETR)


@pytest.fixture(scope="module")
def detr_onnx(tmp_path_factory):
    """DETR: softmax scores, each query's best class (S = min(NUM_SELECT, NQ) = 10)."""
    return _export_by_command_line(tmp_path_factory.mktemp("detr"), DETR)


@pytest.fixture(scope="module")
def conditional_detr_onnx(tmp_path_factory):
    return _export_by_command_line(tmp_path_factory.mktemp("conditional_detr"), CONDITIONAL_DETR)


@pytest.fixture(scope="module")
def dino_onnx(tmp_path_factory):
    """DINO: NQ = min(NUM_QUERIES, tokens) anchors from the encoder's top-k proposals, a count
    that depends on the image size (the command's check runs a single image, batch 1)."""
    return _export_by_command_line(tmp_path_factory.mktemp("dino"), DINO)


@pytest.fixture(scope="module")
def deformable_onnx(tmp_path_factory):
    model = _model(DEFORMABLE)
    path = str(tmp_path_factory.mktemp("deformable") / "model.onnx")
    export_onnx(model, path, EXPORT_SIZE)
    return model, path


@pytest.mark.parametrize(
    "exported, detections",
    [("dab_detr_onnx", 20), ("deformable_onnx", 20), ("detr_onnx", 10),
     ("conditional_detr_onnx", 20), ("dino_onnx", 20)],
)
def test_onnxruntime_matches_pytorch_on_a_padded_batch_of_other_sizes(
    exported, detections, request
):
    model, path = request.getfixturevalue(exported)
    images = _batch(model)
    assert tuple(images.tensor.shape[-2:]) == (112, 150)
    expected = pytorch_detections(model, images)
    actual = run_onnxruntime(path, images.tensor, torch.tensor(images.image_sizes))
    assert actual[0].shape == (2, detections) and actual[1].dtype == torch.int64
    assert actual[2].shape == (2, detections, 4)
    _assert_same_detections(expected, actual)


@pytest.mark.parametrize("sizes", [[(40, 30)], [(40, 30), (16, 16)], [(16, 16)]])
def test_dino_selects_as_many_anchors_as_a_small_image_has_tokens(dino_onnx, sizes):
    """Images with fewer encoder tokens than NUM_QUERIES (10): 3 x 2 + 2 + 1 and 1 + 1 + 1 at
    strides 16, 32 and 64, so NQ = 9 and 3 (S = min(20, NQ x 5)), and the proposals of the
    padding and the border (inf, anchor sigmoid(inf) = 1) among those selected."""
    model, path = dino_onnx
    gen = torch.Generator().manual_seed(2)
    images = model.preprocess_image(
        [{"image": torch.rand(3, h, w, generator=gen) * 255} for h, w in sizes])
    expected = pytorch_detections(model, images)
    actual = run_onnxruntime(path, images.tensor, torch.tensor(images.image_sizes))
    assert actual[0].shape == expected[0].shape == (len(sizes), 15 if sizes == [(16, 16)] else 20)
    _assert_same_detections(expected, actual)


@pytest.mark.parametrize("config_file", [DAB_DETR, DETR, DINO])
def test_the_wrapper_computes_what_inference_does(config_file):
    """In PyTorch, the traced module's outputs are model.inference's, exactly."""
    model = _model(config_file)
    images = _batch(model)
    with torch.no_grad():
        got = ExportableDetector(model)(images.tensor, torch.tensor(images.image_sizes))
    for g, e in zip(got, pytorch_detections(model, images)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_the_file_declares_dynamic_sizes_and_the_normalisation(dab_detr_onnx):
    onnx = require("onnx")
    graph = onnx.load(dab_detr_onnx[1])
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in graph.graph.input}
    assert dims == {"images": ["batch", 3, "height", "width"], "image_sizes": ["batch", 2]}
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["dab_detr.pixel_mean"] == "[123.675, 116.28, 103.53]"
    assert props["dab_detr.input_format"] == "RGB"


@pytest.mark.parametrize("sizes", [((150, 135), (10, 9)), ((810, 1216), (26, 38)),
                                   ((117, 33), (8, 3)), ((5, 7), (5, 7))])
def test_resize_padding_mask_is_interpolate_nearest(sizes):
    (h, w), size = sizes
    mask = torch.rand(2, h, w, generator=torch.Generator().manual_seed(h)) > 0.5
    expected = F.interpolate(mask[None].float(), size=size)[0].bool()
    torch.testing.assert_close(resize_padding_mask(mask, size), expected, atol=0, rtol=0)


def test_an_unknown_meta_architecture_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"MODEL.META_ARCHITECTURE='GeneralizedRCNN'"):
        main(["--config-file", DAB_DETR, "--output", str(tmp_path / "m.onnx"),
              "--opts", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"])
    assert not os.path.exists(tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="Linear: the ONNX export supports"):
        ExportableDetector(torch.nn.Linear(2, 2))
    cfg = get_dab_detr_cfg(DAB_DETR, [])
    check_exportable(cfg)  # the shapes config is exportable


@pytest.fixture(scope="module")
def dat_onnx(tmp_path_factory):
    """A DAT-backbone model, exported and checked by the command line (on single images: its
    graph runs a padded batch as one, PyTorch each image alone)."""
    return _export_by_command_line(tmp_path_factory.mktemp("dat"), DAT)


@pytest.mark.parametrize("size", [(112, 150), (77, 120), (64, 64)])
def test_a_dat_model_matches_pytorch_on_single_images_of_other_sizes(dat_onnx, size):
    model, path = dat_onnx
    gen = torch.Generator().manual_seed(2)
    images = model.preprocess_image([{"image": torch.rand(3, *size, generator=gen) * 255}])
    expected = pytorch_detections(model, images)
    actual = run_onnxruntime(path, images.tensor, torch.tensor(images.image_sizes))
    _assert_same_detections(expected, actual)


def test_a_model_that_torch_export_refuses_is_named_by_its_code(tmp_path, monkeypatch):
    """Data-dependent Python in the model (here a mask resize that branches on the mask's
    values) stops torch.export: the error names the model's function, not torch's stack."""
    import dab_detr.modeling.meta_arch.base as base_module

    def resize_by_value(mask, size):
        return resize_padding_mask(mask if mask.any() else ~mask, size)

    monkeypatch.setattr(base_module, "resize_padding_mask", resize_by_value)
    model = build_model(get_dab_detr_cfg(DAB_DETR, ["MODEL.WEIGHTS", "", *OPTS]))
    # the single-map models' feature map (backbone, padding mask, position encoding)
    with pytest.raises(ExportError, match=r"could not capture DABDETR in dab_detr/modeling/"
                       r"meta_arch/base.py:\d+ \(feature_map\): "
                       r"GuardOnDataDependentSymNode"):
        export_onnx(model, str(tmp_path / "m.onnx"), EXPORT_SIZE)
    assert not os.path.exists(tmp_path / "m.onnx")


def test_a_graph_whose_batch_size_came_out_constant_is_refused():
    """torch.onnx.export retries a capture that fixed a dynamic dimension with it constant:
    the export refuses such a graph, naming the dimension."""
    ir = pytest.importorskip("onnx_ir")
    from dab_detr.export.exporter import _check_dynamic

    def graph(batch):
        inputs = [ir.Value(name="images", shape=ir.Shape([batch, 3, "height", "width"]),
                           type=ir.TensorType(ir.DataType.FLOAT)),
                  ir.Value(name="image_sizes", shape=ir.Shape([batch, 2]),
                           type=ir.TensorType(ir.DataType.INT64))]
        return ir.Model(ir.Graph(inputs, [], nodes=[], opset_imports={"": 20}), ir_version=10)

    example = (torch.zeros(2, 3, 96, 128), torch.zeros(2, 2, dtype=torch.long))
    _check_dynamic(graph("batch"), "DINO", example)
    with pytest.raises(ExportError, match=r"graph of DINO has a constant batch \(2, the "
                       r"example's\).*len\(tensor\)"):
        _check_dynamic(graph(2), "DINO", example)


def test_constants_that_the_optimiser_left_out_of_the_graph_are_restored(tmp_path):
    """onnxscript's FuseSuccessiveClip, run twice on one tensor, files the two fused Clips'
    bounds under one name: the first Clip's are then in no list of the graph."""
    ir = pytest.importorskip("onnx_ir")
    onnxruntime = require("onnxruntime")
    from dab_detr.export.exporter import _register_orphaned_constants

    x = ir.Value(name="x", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    low, high = (ir.Value(name=n, const_value=ir.tensor(np.array(v, np.float32)))
                 for n, v in (("x_min_1", 0.0), ("x_max_1", 1.0)))
    clip = ir.node("Clip", [x, low, high])
    clip.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], clip.outputs, nodes=[clip], opset_imports={"": 20}),
                     ir_version=10)
    _register_orphaned_constants(model)
    ir.save(model, str(tmp_path / "clip.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "clip.onnx"))
    y = session.run(None, {"x": np.array([-1.0, 0.5, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


def test_a_missing_runtime_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match="needs onnxruntime.*pip install"):
        require("onnxruntime")
