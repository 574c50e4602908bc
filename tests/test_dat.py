"""DAT as a backbone: any input size, features independent of the batch's padding, its window
attention against a direct computation, freezing, config errors, and the official ImageNet
checkpoints through ``--source dat`` and ``MODEL.WEIGHTS`` (a local HTTP server standing in for
the release's URL). Equality with the official code: ``test_equivalence_dat.py``.

Shapes: B batch, C channels, H x W map.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from test_equivalence_dat import DAT_REFERENCE_DIR, _keep
from test_weights_layouts import cache, server  # noqa: F401  (fixtures)

from conftest import load_cfg
from dab_detr.checkpoint import DabDetrCheckpointer, convert_dat, detect_layout
from dab_detr.convert import main as convert_main
from dab_detr.layers.window_attention import WindowAttention, shifted_window_mask
from dab_detr.modeling.dat import DAT, DAT_SIZES, DATSize
from official_reference import official_state_dict

SHAPES_CONFIG = "quick_schedules/dab_deformable_detr_DAT_shapes.yaml"
COCO_CONFIG = "COCO-Detection/dab_deformable_detr_DAT_T_50ep.yaml"
# a narrow DAT with every kind of block in every stage
SMALL = DATSize(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                groups=(1, 1, 2, 4))

pytestmark = pytest.mark.usefixtures("one_thread")


def _backbone(*opts: str):
    cfg = load_cfg(SHAPES_CONFIG, *opts)
    return build_backbone(cfg, ShapeSpec(channels=3)).eval()


def test_any_input_size_runs_with_maps_of_each_stride():
    model = DAT(size=SMALL, out_indices=(0, 1, 2, 3), pretrain_size=64,
                stage_spec=("LS", "LS", "LD", "LD")).eval()
    # 200 x 300 padded to 224 x 320: maps 56x80, 28x40, 14x20, 7x10, none a multiple of 7
    # in both sides but the last; 96 x 160: 24x40 ... 3x5, windows larger than the map
    for h, w in ((224, 320), (96, 160)):
        with torch.no_grad():
            out = model(torch.randn(1, 3, h, w))
        for s in range(4):
            assert out[s].shape == (1, SMALL.dims[s], h // 4 // 2**s, w // 4 // 2**s)
            assert torch.isfinite(out[s]).all()


def test_features_in_an_image_do_not_depend_on_the_batch_padding():
    backbone = _backbone("MODEL.DAT.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']")
    g = torch.Generator().manual_seed(0)
    small = torch.randn(3, 200, 300, generator=g)
    large = torch.randn(3, 288, 416, generator=g)
    alone = torch.zeros(1, 3, 224, 320)  # a batch of one: padded to 32
    alone[0, :, :200, :300] = small
    batch = torch.zeros(2, 3, 288, 416)
    batch[0, :, :200, :300], batch[1] = small, large
    with torch.no_grad():
        expected = backbone(alone, image_sizes=[(200, 300)])
        got = backbone(batch, image_sizes=[(200, 300), (288, 416)])
        batched = backbone(batch)  # the whole batch as one: what the sizes avoid
    for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        h, w = math.ceil(200 / stride), math.ceil(300 / stride)
        torch.testing.assert_close(got[name][:1, :, :h, :w], expected[name][..., :h, :w])
        # beyond the image's own padded area: zeros
        assert (got[name][0, :, 224 // stride:] == 0).all()
        assert (got[name][0, :, :, 320 // stride:] == 0).all()
    # without the sizes, the deformable stages see the other image's padding
    assert (batched["res4"][:1, :, :13, :19] - expected["res4"][..., :13, :19]).abs().max() > 1e-3


def _window_attention_directly(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Each token attends to the tokens of its window in the zero-padded, rolled map, with
    the table's bias of their displacement and -100 between tokens the roll brought from
    opposite edges (regions by position along each axis, as Swin defines them)."""
    b, height, width, c = x.shape
    w, s, heads = attn.window_size, attn.shift, attn.num_heads
    hp, wp = math.ceil(height / w) * w, math.ceil(width / w) * w
    x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
    q, k, v = attn.qkv(x).unflatten(-1, (3, heads, -1)).unbind(-3)  # (B, Hp, Wp, h, d) each

    def region(i: int, n: int) -> int:
        return 0 if i < n - w else (1 if i < n - s else 2)

    out = torch.zeros(b, hp, wp, heads, c // heads, dtype=x.dtype)
    table = attn.position_bias.table
    for y in range(hp):
        for xx in range(wp):
            y0, x0 = y // w * w, xx // w * w
            keys = [(ky, kx) for ky in range(y0, y0 + w) for kx in range(x0, x0 + w)]
            logits = []
            for ky, kx in keys:
                row = (y - ky + w - 1) * (2 * w - 1) + (xx - kx + w - 1)
                logit = (q[:, y, xx] * k[:, ky, kx]).sum(-1) / math.sqrt(c // heads)
                logit = logit + table[row]
                if s and (region(y, hp), region(xx, wp)) != (region(ky, hp), region(kx, wp)):
                    logit = logit - 100
                logits.append(logit)
            weights = torch.stack(logits, -1).softmax(-1)  # (B, h, N)
            values = torch.stack([v[:, ky, kx] for ky, kx in keys], -2)  # (B, h, N, d)
            out[:, y, xx] = (weights[..., None] * values).sum(-2)
    out = attn.proj(out.flatten(-2))
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    return out[:, :height, :width]


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_pads_and_masks_as_computed_directly(shift):
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window_size=4, shift=shift).double()
    torch.nn.init.normal_(attn.position_bias.table)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)  # padded to 8 x 12: 2 x 3 windows
    torch.testing.assert_close(attn(x), _window_attention_directly(attn, x))


def test_freeze_at_freezes_the_patch_embedding_then_stages():
    def module(name: str) -> str:  # body.stem / body.stages.i / body.downsamples.i / ...
        parts = name.split(".")
        return ".".join(parts[:2] if parts[1] in ("stem", "out_norms") else parts[:3])

    for freeze_at, frozen in ((0, set()), (1, {"body.stem"}),
                              (3, {"body.stem", "body.stages.0", "body.stages.1",
                                   "body.downsamples.0"})):
        backbone = _backbone("MODEL.BACKBONE.FREEZE_AT", str(freeze_at))
        got = {module(n) for n, p in backbone.named_parameters() if not p.requires_grad}
        assert got == frozen, freeze_at
        backbone.train()  # frozen stages stay in eval mode: no stochastic depth there
        training = {module(f"body.{n}") for n, m in backbone.body.named_modules()
                    if n and m.training and not n.startswith("out_norms")}
        assert not training & frozen and training, freeze_at


@pytest.mark.parametrize("opts, message", [
    (("MODEL.DAT.DEPTHS", "[2, 2, 6]"), r"MODEL.DAT.DEPTHS=\[2, 2, 6\]: expected one value"),
    (("MODEL.DAT.OUT_FEATURES", "['res6']"), r"DAT's outputs \['res6'\]"),
    (("MODEL.DAT.GROUPS", "[1, 1, 3, 6]"), r"stage 3 has DIMS 128, HEADS 4, GROUPS 3"),
    (("MODEL.DAT.STAGE_SPEC", "['LS', 'LS', 'LX', 'LD']"), r"stage pattern 'LX'"),
])
def test_bad_dat_settings_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        _backbone(*opts)


def test_outputs_follow_the_detectors_maps_unless_named():
    assert _backbone().output_shape().keys() == {"res4", "res5"}  # MODEL.RESNETS.OUT_FEATURES
    shapes = _backbone("MODEL.DAT.OUT_FEATURES", "['res3']").output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {"res3": (64, 8)}


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """An official DAT-T ImageNet checkpoint (the reference rule's weights, in float32 as
    released), written once for the module."""
    sd = official_state_dict(os.path.join(DAT_REFERENCE_DIR, "dat_tiny.json"), keep=_keep)
    path = tmp_path_factory.mktemp("dat_release") / "dat_tiny_in1k_224.pth"
    torch.save({"model": {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                "epoch": 300}, path)
    yield path
    path.unlink()


def test_the_command_line_converts_an_official_checkpoint(release_file, tmp_path):
    out = tmp_path / "DAT-T.pth"
    convert_main([str(release_file), str(out)])  # --source auto: the official DAT's layout
    converted = torch.load(out, weights_only=True)["model"]
    expected = convert_dat(torch.load(release_file, weights_only=True)["model"])
    assert converted.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(converted[k], expected[k])
    checked = tmp_path / "checked.pth"  # against the DAT-T config: every backbone tensor
    convert_main(["--source", "dat", "--config-file",
                  os.path.join(os.path.dirname(__file__), "..", "configs", COCO_CONFIG),
                  str(release_file), str(checked)])
    assert torch.load(checked, weights_only=True)["model"].keys() == expected.keys()


def test_model_weights_downloads_and_converts_the_released_url(release_file, server):  # noqa: F811
    cfg = load_cfg(COCO_CONFIG)
    released = get_released_url()
    path = released.split("cloud.tsinghua.edu.cn", 1)[1]  # "/f/<id>/?dl=1"
    server.files[path] = release_file
    model = build_model(cfg)
    DabDetrCheckpointer(model).load(server.url(path))
    assert server.requests == [path]
    expected = convert_dat(torch.load(release_file, weights_only=True)["model"])
    state = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v)
    # the detection norms are not in the file: weight 1, bias 0
    torch.testing.assert_close(state["backbone.body.out_norms.1.weight"], torch.ones(192))
    assert detect_layout(expected, state.keys()) == "dab_detr"


def get_released_url() -> str:
    """The DAT-T ImageNet URL that the COCO DAT-T configs give ``MODEL.WEIGHTS``."""
    from dab_detr.config import get_dab_detr_cfg

    url = get_dab_detr_cfg(os.path.join(os.path.dirname(__file__), "..", "configs",
                                         COCO_CONFIG)).MODEL.WEIGHTS
    assert url.startswith("https://cloud.tsinghua.edu.cn/f/") and url.endswith("/?dl=1")
    return url


def test_dat_sizes_are_the_released_models():
    # configs/dat_{tiny,small,base}.yaml of the official tag CVPR2022
    assert DAT_SIZES["T"] == DATSize((96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24),
                                     (1, 1, 3, 6))
    assert DAT_SIZES["S"].depths == (2, 2, 18, 2)
    assert DAT_SIZES["B"] == DATSize((128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32),
                                     (1, 1, 4, 8))
    cfg = load_cfg(COCO_CONFIG).MODEL.DAT  # the config's defaults: DAT-T
    assert DATSize(tuple(cfg.DIMS), tuple(cfg.DEPTHS), tuple(cfg.HEADS),
                   tuple(cfg.GROUPS)) == DAT_SIZES["T"]


def test_deformed_points_stay_float32_under_bfloat16_autocast():
    """A bfloat16 location near 1 would be off by up to a quarter of a cell."""
    from dab_detr.layers.dat_attention import DATAttention

    torch.manual_seed(0)
    attn = DATAttention(16, 4, 2, kernel_size=3, offset_range_factor=2.0, table_size=(6, 8))
    x = torch.randn(1, 12, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        points = attn.sampling_locations(attn.proj_q(x))
        out = attn(x)
    assert points.dtype == torch.float32
    with torch.no_grad():
        expected = attn.sampling_locations(attn.proj_q(x))  # float32 throughout
    # only the offset network's bfloat16 output differs: about a hundredth of a cell (2 / 20)
    assert (points - expected).abs().max() < 0.05 * 2 / 20
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(56, 56), (28, 56)])
def test_shifted_window_mask_is_the_reference_rule(size):
    """The rule of tests/data/dat_outputs/README.md (Swin's slices), for 7x7 windows, shift 4."""
    h, w = size
    regions = torch.zeros(h, w)
    n = 0
    for rows in (slice(0, -7), slice(-7, -4), slice(-4, None)):
        for cols in (slice(0, -7), slice(-7, -4), slice(-4, None)):
            regions[rows, cols] = n
            n += 1
    windows = regions.reshape(h // 7, 7, w // 7, 7).permute(0, 2, 1, 3).reshape(-1, 49)
    differ = windows[:, None, :] - windows[:, :, None]
    expected = torch.where(differ != 0, -100.0, 0.0)
    torch.testing.assert_close(shifted_window_mask(size, 7, 4), expected, rtol=0, atol=0)
