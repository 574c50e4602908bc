"""The mechanism pictures' numbers (dab_detr/modeling/transformer/mechanism.py and
deformable_transformer/mechanism.py) and tools/plot_metrics.py: the positional attention of an
anchor peaks at its centre and narrows with w_ref / w and with a lower temperature; a traced
model's queries, maps, sampling points and (DINO) selected proposals are exactly what its
decoder computed."""

import importlib.util
import json
import os
import subprocess
import sys
from typing import Tuple

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from conftest import REPO, config_path, load_cfg
from dab_detr.layers import multi_scale_deformable_attention, refine_boxes
from dab_detr.modeling.deformable_transformer.mechanism import (
    level_strides,
    level_to_pixels,
    trace_sampling,
)
from dab_detr.modeling.transformer import modulate_hw
from dab_detr.modeling.transformer.mechanism import (
    image_position_keys,
    model_positional_maps,
    positional_attention_map,
    positional_query,
    sine_prior_map,
    trace_decoder,
)

SHAPES = "quick_schedules/dab_detr_R_18_shapes.yaml"
GRID = (24, 32)  # (gh, gw) key positions


def _centre_cell(cx: float, cy: float, grid: Tuple[int, int] = GRID) -> Tuple[int, int]:
    """The (row, col) whose encoded position is (cy, cx): cell k encodes (k + 1) / n."""
    return round(cy * grid[0]) - 1, round(cx * grid[1]) - 1


def _x_spread(attn: torch.Tensor, cx: float, grid: Tuple[int, int] = GRID) -> torch.Tensor:
    """Second moment about ``cx`` of the x marginal of a ``(gh * gw,)`` map."""
    p_x = attn.view(grid).sum(0)
    x = torch.arange(1, grid[1] + 1) / grid[1]
    return (p_x * (x - cx) ** 2).sum()


@pytest.mark.parametrize("temperature", [20.0, 10000.0])
@pytest.mark.parametrize("cell", [(0, 0), (5, 20), (23, 31), (11, 7)])
def test_sine_prior_peaks_at_anchor_centre(temperature, cell):
    row, col = cell
    cx, cy = (col + 1) / GRID[1], (row + 1) / GRID[0]
    anchor = torch.tensor([cx, cy, 0.2, 0.3])
    for modulation in (None, torch.tensor([3.0, 0.5])):
        attn = sine_prior_map(anchor, GRID, temperature, modulation)
        assert attn.shape == (GRID[0] * GRID[1],)
        torch.testing.assert_close(attn.sum(), torch.tensor(1.0))
        assert divmod(int(attn.argmax()), GRID[1]) == _centre_cell(cx, cy)


def test_sine_prior_narrows_along_x_as_w_ref_over_w_grows():
    anchor = torch.tensor([0.4, 0.6, 0.2, 0.2])
    maps = [sine_prior_map(anchor, GRID, 20.0, torch.tensor([m, 1.0])) for m in (0.5, 1, 2, 4)]
    spreads = torch.stack([_x_spread(a, 0.4) for a in maps])
    assert (spreads[1:] < spreads[:-1]).all(), spreads
    # x and y terms add in the logits: the softmax factorises and the y marginal stays put
    for attn in maps[1:]:
        torch.testing.assert_close(attn.view(GRID).sum(1), maps[0].view(GRID).sum(1))


def test_sine_prior_is_sharper_at_a_lower_temperature():
    anchor = torch.tensor([0.5, 0.5, 0.2, 0.2])
    sharp = _x_spread(sine_prior_map(anchor, GRID, 20.0), 0.5)
    flat = _x_spread(sine_prior_map(anchor, GRID, 10000.0), 0.5)
    assert sharp < 0.8 * flat, (sharp, flat)


def test_modulate_hw_scales_y_then_x_halves():
    sine = torch.arange(1.0, 9.0)  # y: 1..4, x: 5..8
    out = modulate_hw(sine, torch.tensor([10.0, 2.0]))  # (w_ref / w, h_ref / h)
    torch.testing.assert_close(out, torch.tensor([2.0, 4, 6, 8, 50, 60, 70, 80]))
    assert modulate_hw(sine, None) is sine


def _traced_model(*opts: str):
    """A random-weights shapes model whose box head moves the anchors, traced on one
    96 x 128 image (a 6 x 8 feature map at the shapes backbone's stride 16)."""
    model = build_model(load_cfg(SHAPES, *opts)).eval()
    with torch.no_grad():
        last = model.bbox_embed.layers[-1]
        last.weight.copy_(torch.randn(last.weight.shape) * 0.1)
    image = torch.rand(3, 96, 128) * 255
    images = model.preprocess_image([{"image": image}])
    return model, images, trace_decoder(model, images)


def test_trace_rebuilds_the_queries_the_decoder_used():
    model, images, trace = _traced_model()
    decoder = model.transformer.decoder
    num_layers, nq = len(decoder.layers), model.anchors().shape[0]
    assert trace.anchors.shape == (num_layers, nq, 4)
    stride = model.backbone.output_shape()[model.in_feature].stride
    assert trace.feature_size == (96 // stride, 128 // stride)
    torch.testing.assert_close(trace.anchors[0], model.anchors().sigmoid())
    assert not torch.allclose(trace.anchors[1], trace.anchors[0])  # refined by layer 0
    for layer in range(num_layers):
        for query in range(nq):
            pq = positional_query(decoder, trace, layer, query)
            assert pq.modulation.shape == (2,)
            torch.testing.assert_close(modulate_hw(pq.sine, pq.modulation), pq.spatial)
    with torch.no_grad():
        outputs = model.forward_predictions(images)
    torch.testing.assert_close(trace.outputs["pred_boxes"], outputs["pred_boxes"])


@pytest.mark.parametrize("layer", [0, 2])
def test_model_maps_are_the_positional_term_of_the_cross_attention(layer):
    model, images, trace = _traced_model()
    ca = model.transformer.decoder.layers[layer]
    seen = {}
    hook = ca.cross_attn.register_forward_pre_hook(
        lambda module, args: seen.update(query=args[0][0], key=args[1][0])
    )
    with torch.no_grad():
        model.forward_predictions(images)
    hook.remove()
    h, c = ca.nhead, model.transformer.d_model
    # (N, 2C) -> (N, h, 2C/h): per head, content channels then positional channels
    q_pos = seen["query"].unflatten(-1, (h, 2 * c // h))[..., c // h:]
    k_pos = seen["key"].unflatten(-1, (h, 2 * c // h))[..., c // h:]
    expected = torch.einsum("qhd,khd->qhk", q_pos, k_pos) * (2 * c / h) ** -0.5
    with torch.no_grad():
        keys = ca.ca_kpos_proj(image_position_keys(model.position_embedding, trace.feature_size))
        logits = positional_attention_map(ca.ca_qpos_sine_proj(trace.spatial[layer]), keys, h,
                                          softmax=False)
        maps = model_positional_maps(model, layer, trace.spatial[layer, 5], trace.feature_size)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(maps, expected[5].softmax(-1))


def test_model_maps_with_identity_projections_peak_at_the_anchor_centre():
    # the anchors' own encoding uses temperature 10000: give the image's the same
    model, _, trace = _traced_model("MODEL.DAB_DETR.PE_TEMPERATURE_H", "10000",
                                    "MODEL.DAB_DETR.PE_TEMPERATURE_W", "10000")
    ca = model.transformer.decoder.layers[0]
    with torch.no_grad():
        for proj in (ca.ca_kpos_proj, ca.ca_qpos_sine_proj):
            proj.weight.copy_(torch.eye(proj.weight.shape[0]))
            proj.bias.zero_()
    h = ca.nhead
    for query in range(0, 30, 7):
        pq = positional_query(model.transformer.decoder, trace, 0, query)
        cx, cy = pq.anchor[:2].tolist()
        for sine in (pq.sine, pq.spatial):
            maps = model_positional_maps(model, 0, sine, GRID).view(h, *GRID)
            # channels: y then x, so the first heads see only y and the last only x; the
            # first of each half holds the highest frequencies
            y_head, x_head = maps[0], maps[h // 2]
            torch.testing.assert_close(y_head, y_head[:, :1].expand_as(y_head))
            torch.testing.assert_close(x_head, x_head[:1].expand_as(x_head))
            row, col = _centre_cell(cx, cy)
            assert abs(int(y_head[:, 0].argmax()) - row) <= 1
            assert abs(int(x_head[0].argmax()) - col) <= 1


def test_trace_refuses_a_batch():
    model = build_model(load_cfg(SHAPES)).eval()
    images = model.preprocess_image([{"image": torch.zeros(3, 32, 32)}] * 2)
    with pytest.raises(ValueError, match="one image"):
        trace_decoder(model, images)


def test_plot_metrics_writes_a_png(tmp_path):
    records = []
    for it in range(0, 100, 10):
        records.append({"iteration": it, "total_loss": 10.0 - it / 20, "loss_ce": 1.0,
                        "loss_bbox": 0.5, "loss_giou": 0.8, "lr": 1e-4})
    for it in (49, 99):
        records.append({"iteration": it, "bbox/AP": it / 5, "bbox/AP50": it / 3,
                        "bbox/AP75": it / 6})
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{truncated")
    out = tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), str(path),
         "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


DEFORMABLE = "quick_schedules/dab_deformable_detr_R_18_shapes.yaml"
DINO = "quick_schedules/dino_R_18_shapes.yaml"


def _sampling_trace(size: Tuple[int, int] = (96, 128), config: str = DEFORMABLE):
    """A random-weights shapes DAB-Deformable-DETR (or ``config``'s model: DINO) whose
    cross-attentions sample off their initial grid with unequal weights and whose box heads
    move the anchors (DINO: and whose final decoder norm is not the identity on the layers'
    normed outputs), traced on one ``size`` (h, w) image; with every cross-attention call as
    the test's own hook saw it, ``(args, output)``."""
    model = build_model(load_cfg(config)).eval()
    heads = model.bbox_embed
    with torch.no_grad():
        for layer in model.transformer.decoder.layers:
            layer.cross_attn.sampling_offsets.weight.normal_(0, 0.05)
            layer.cross_attn.attention_weights.weight.normal_(0, 0.3)
        for head in heads if isinstance(heads, torch.nn.ModuleList) else [heads]:
            head.layers[-1].weight.normal_(0, 0.1)
        norm = model.transformer.decoder.norm  # DINO's final norm: off the identity
        if norm is not None:
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
    images = model.preprocess_image([{"image": torch.rand(3, *size) * 255}])
    calls = []
    hooks = [layer.cross_attn.register_forward_hook(
        lambda module, args, output: calls.append((args, output)))
        for layer in model.transformer.decoder.layers]
    trace = trace_sampling(model, images)
    for hook in hooks:
        hook.remove()
    return model, images, trace, calls


def _check_cross_attention_calls(model, trace, calls, num_queries: int = 30):
    """The trace's reference boxes, sampling locations and weights rebuild each decoder
    cross-attention's output."""
    layers = model.transformer.decoder.layers
    ca = layers[0].cross_attn
    shape = (len(layers), num_queries, ca.n_heads, ca.n_levels, ca.n_points)
    assert trace.locations.shape == (*shape, 2) and trace.weights.shape == shape
    assert len(calls) == len(layers)
    for n, ((_, reference, memory, shapes, _, mask), output) in enumerate(calls):
        ca = layers[n].cross_attn
        torch.testing.assert_close(trace.reference_boxes[n], reference[0])
        torch.testing.assert_close(trace.spatial_shapes, torch.tensor(shapes))
        with torch.no_grad():
            value = ca.value_proj(memory).masked_fill(mask[..., None], 0.0)
            # (1, S, C) -> (1, S, h, C / h)
            value = value.unflatten(-1, (ca.n_heads, -1))
            rebuilt = ca.output_proj(multi_scale_deformable_attention(
                value, shapes, trace.locations[n][None], trace.weights[n][None]))
        torch.testing.assert_close(rebuilt, output)


def test_sampling_trace_is_what_the_cross_attention_used():
    model, images, trace, calls = _sampling_trace()
    _check_cross_attention_calls(model, trace, calls)
    # the anchors each layer used: the learned ones, then each layer's refined boxes
    torch.testing.assert_close(trace.anchors[0], model.queries(1)[1][0])
    boxes = [aux["pred_boxes"][0] for aux in trace.outputs["aux_outputs"]]
    torch.testing.assert_close(trace.anchors[1:], torch.stack(boxes))
    with torch.no_grad():
        outputs = model.forward_predictions(images)
    torch.testing.assert_close(trace.outputs["pred_boxes"], outputs["pred_boxes"])


def test_sampling_weights_sum_to_one_over_levels_and_points_per_head():
    _, _, trace, _ = _sampling_trace()
    n, nq, h, levels, points = trace.weights.shape
    torch.testing.assert_close(trace.weights.sum((-2, -1)), torch.ones(n, nq, h))
    # not the uniform weights of the initialisation, whose sum would prove nothing
    assert not torch.allclose(trace.weights, torch.full_like(trace.weights, 1 / (levels * points)))


def test_level_to_pixels_puts_an_unpadded_level_centre_at_the_image_centre():
    # 128 x 192: a multiple of every stride, so that each map covers the image exactly
    model, _, trace, _ = _sampling_trace((128, 192))
    strides = level_strides(model)
    assert strides == [16, 32, 64]
    expected_shapes = torch.tensor([[8, 12], [4, 6], [2, 3]])
    torch.testing.assert_close(trace.spatial_shapes, expected_shapes)
    torch.testing.assert_close(trace.valid_sizes, expected_shapes)  # one image: no padding
    assert trace.image_size == (128, 192)
    # (L, 2, 2): per level, the centre and the bottom-right corner of the map
    corners = torch.tensor([[0.5, 0.5], [1.0, 1.0]]).expand(3, 2, 2)
    pixels = level_to_pixels(corners, trace.spatial_shapes, strides)
    torch.testing.assert_close(pixels, torch.tensor([[96.0, 64.0], [192.0, 128.0]]).expand(3, 2, 2))
    # a level's reference box lands where the image-normalised anchor is
    boxes = level_to_pixels(trace.reference_boxes.unflatten(-1, (2, 2)), trace.spatial_shapes,
                            strides).flatten(-2)  # (N, NQ, L, 4)
    scale = torch.tensor([192.0, 128.0, 192.0, 128.0])
    torch.testing.assert_close(boxes, (trace.anchors * scale)[:, :, None].expand_as(boxes))


def test_dino_trace_starts_from_the_selected_proposals():
    """DINO: the same trace; the first anchors are the selected encoder proposals
    (``interm_outputs``), and each next layer's are the refinement of the layer's raw output,
    not the boxes it reports from its normed output."""
    model, images, trace, calls = _sampling_trace(config=DINO)
    _check_cross_attention_calls(model, trace, calls)
    interm = trace.outputs["interm_outputs"]
    assert interm["pred_logits"].shape == (1, 30, model.num_classes)
    torch.testing.assert_close(trace.anchors[0], interm["pred_boxes"][0])
    # the 30 selected are the encoder's best by their best class, best first
    selected = interm["pred_logits"][0].max(-1).values
    assert (selected[:-1] >= selected[1:]).all()
    decoder = model.transformer.decoder
    raw = []
    hooks = [layer.register_forward_hook(lambda module, args, output: raw.append(output))
             for layer in decoder.layers]
    with torch.no_grad():
        outputs = model.forward_predictions(images)
        for hook in hooks:
            hook.remove()
        for n in range(len(decoder.layers) - 1):
            refined = refine_boxes(trace.anchors[n], decoder.box_head(n)(raw[n][0]))
            torch.testing.assert_close(trace.anchors[n + 1], refined)
    boxes = torch.stack([aux["pred_boxes"][0] for aux in trace.outputs["aux_outputs"]])
    assert not torch.allclose(trace.anchors[1:], boxes)  # the final norm comes in between
    torch.testing.assert_close(trace.outputs["pred_boxes"], outputs["pred_boxes"])
    torch.testing.assert_close(trace.weights.sum((-2, -1)), torch.ones(trace.weights.shape[:3]))


def test_sampling_trace_refuses_a_batch():
    model = build_model(load_cfg(DEFORMABLE)).eval()
    images = model.preprocess_image([{"image": torch.zeros(3, 32, 32)}] * 2)
    with pytest.raises(ValueError, match="one image"):
        trace_sampling(model, images)


def _load_tool():
    path = os.path.join(REPO, "tools", "visualize_mechanism.py")
    spec = importlib.util.spec_from_file_location("visualize_mechanism", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLING_PICTURES = ["sampling_points_layer0.png", "sampling_points_layer1.png",
                     "sampling_points_layer2.png"]


@pytest.mark.parametrize("config, pictures", [
    (DEFORMABLE, SAMPLING_PICTURES),
    (DINO, [*SAMPLING_PICTURES, "selected_proposals.png"]),
    ("quick_schedules/dab_deformable_detr_DAT_shapes.yaml",
     [*SAMPLING_PICTURES, "dat_deformed_points.png"]),
    (SHAPES, ["positional_attention_layer0.png", "positional_attention_layer1.png",
              "positional_attention_layer2.png", "positional_attention_temperature.png"]),
])
def test_visualize_mechanism_writes_its_pictures(tmp_path, config, pictures):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (110, 150, 3), dtype=np.uint8)
                    ).save(src)
    out = tmp_path / "vis"
    _load_tool().main(["--config-file", config_path(config), "--input", str(src),
                       "--output", str(out), "--grid", "16", "--dpi", "40",
                       "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    assert sorted(os.listdir(out)) == sorted(["anchors.png", "box_refinement.png", *pictures])
    for name in os.listdir(out):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


@pytest.mark.parametrize("config", ["quick_schedules/detr_R_18_shapes.yaml",
                                    "quick_schedules/conditional_detr_R_18_shapes.yaml"])
def test_visualize_mechanism_refuses_models_without_anchor_boxes(tmp_path, config, capsys):
    with pytest.raises(SystemExit):
        _load_tool().main(["--config-file", config_path(config), "--input", "unused.png",
                           "--output", str(tmp_path / "vis"), "--opts", "MODEL.WEIGHTS", ""])
    assert "the pictures are of anchor boxes" in capsys.readouterr().err
    assert not (tmp_path / "vis").exists()
