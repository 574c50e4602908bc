"""``python -m dab_detr.convert`` and ``dab_detr.checkpoint``: every official tensor lands
in the model, ImageNet ResNets give torchvision's features, unsafe files are refused, and
Detectron2 checkpoints round-trip exactly.

The official checkpoints are stood in for by random tensors with their exact names and
shapes, listed in ``tests/data/official_dab_detr_state_dict_keys.json``.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes, Instances

from conftest import REFERENCE, REPO, config_path, load_cfg
from dab_detr.checkpoint import (
    UnsafeCheckpointError,
    coco_class_rows,
    convert,
    load_state_dict_file,
)
from dab_detr.convert import main as convert_main
from dab_detr.modeling.meta_arch.backbone import build_dab_detr_resnet_backbone

# family of official checkpoint -> configs whose models it must fill exactly
OFFICIAL_CONFIGS = [
    ("R50", "dab_detr_R_50_50ep.yaml"),
    ("R50", "dab_detr_R_50_DC5_50ep.yaml"),
    ("R50_3pat", "dab_detr_R_50_3pat_50ep.yaml"),
    ("R50_3pat", "dab_detr_R_50_DC5_3pat_50ep.yaml"),
    ("R50", "dab_detr_R_50_DC5_fixxy_50ep.yaml"),
    ("R101", "dab_detr_R_101_50ep.yaml"),
    ("R101", "dab_detr_R_101_DC5_50ep.yaml"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are small or run on tiny inputs: a second intra-op thread saves little,
    and on a busy machine its spin-waits make the many small ops of a training step up to 30
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _coco(name: str) -> str:
    return config_path(os.path.join("COCO-Detection", name))


def _load_converted(path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert set(data) <= {"model", "__author__", "dab_detr_arch"} and "model" in data
    return data["model"]


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality; ``torch.equal`` first, as it is much faster on the large tensors."""
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _official_to_d2(name: str) -> str:
    """The expected Detectron2 name of an official tensor, spelled out independently of the
    converter's regular expressions."""
    prefix = "backbone.0.body."
    if not name.startswith(prefix):
        return name
    parts = name[len(prefix) :].split(".")
    if parts[0] in ("conv1", "bn1"):  # stem
        return "backbone.stem.conv1." + ("norm." if parts[0] == "bn1" else "") + parts[1]
    stage = f"res{int(parts[0][len('layer'):]) + 1}"
    block, layer, rest = parts[1], parts[2], parts[3:]
    if layer == "downsample":  # downsample.0 is the conv, downsample.1 its norm
        module = "shortcut" if rest[0] == "0" else "shortcut.norm"
        rest = rest[1:]
    elif layer.startswith("bn"):
        module = f"conv{layer[2:]}.norm"
    else:
        module = layer
    return ".".join(["backbone", stage, block, module, *rest])


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """``family -> path`` of a random ``{"model": state_dict}`` file with exactly the
    official names and shapes (written once per family)."""
    with open(REFERENCE) as f:
        shapes = json.load(f)
    paths = {}

    def get(family: str):
        if family not in paths:
            g = torch.Generator().manual_seed(len(paths))
            sd = {k: torch.randn(s, generator=g) for k, s in shapes[family].items()}
            # the released models tie the decoder's box head to the prediction head
            for k in [k for k in sd if k.startswith("bbox_embed.")]:
                sd["transformer.decoder." + k] = sd[k].clone()
            paths[family] = tmp_path_factory.mktemp(family) / "checkpoint.pth"
            torch.save({"model": sd}, paths[family])
        return paths[family]

    return get


def test_coco_class_rows():
    # the 80 COCO category ids in increasing order (Detectron2's contiguous order)
    missing = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert coco_class_rows() == [i for i in range(1, 91) if i not in missing]


@pytest.mark.parametrize("family,config", OFFICIAL_CONFIGS)
def test_official_mapping_is_complete(family, config, official_file, tmp_path):
    src = official_file(family)
    out = tmp_path / "converted.pth"
    convert_main(["--source", "official", "--config-file", _coco(config), str(src), str(out)])
    model = build_model(load_cfg(os.path.join("COCO-Detection", config)))
    model.load_state_dict(_load_converted(out), strict=True)  # no missing, no unexpected

    official = torch.load(src, weights_only=True, mmap=True)["model"]
    state = model.state_dict()
    special = {"class_embed.weight", "class_embed.bias", "refpoint_embed.weight"}
    for name, value in official.items():
        if name not in special:
            _assert_equal(state[_official_to_d2(name)], value)
    rows = coco_class_rows()
    torch.testing.assert_close(model.class_embed.weight, official["class_embed.weight"][rows],
                               rtol=0, atol=0)
    torch.testing.assert_close(model.class_embed.bias, official["class_embed.bias"][rows],
                               rtol=0, atol=0)
    anchors = official["refpoint_embed.weight"]
    if "fixxy" in config:  # centres in the refpoint_xy buffer, w/h learned
        torch.testing.assert_close(model.refpoint_xy, anchors[:, :2], rtol=0, atol=0)
        torch.testing.assert_close(model.refpoint_embed.weight, anchors[:, 2:], rtol=0, atol=0)
    else:
        assert model.refpoint_xy is None
        torch.testing.assert_close(model.refpoint_embed.weight, anchors, rtol=0, atol=0)
    torch.testing.assert_close(model.anchors(), anchors, rtol=0, atol=0)


def test_official_rejects_other_files(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"not a checkpoint of the official DAB-DETR, DN-DETR, "
                                         r"DETR, Conditional DETR or DINO code.*"
                                         r"'refpoint_embed.weight'"):
        convert_main(["--source", "official", str(path), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize(
    "family,config,problem",
    [
        ("R50", "dab_detr_R_101_50ep.yaml", r"missing: backbone\.res4\.6\.conv1\.weight"),
        ("R101", "dab_detr_R_50_50ep.yaml", r"unexpected: backbone\.res4\.22\.conv3\.weight"),
        ("R50_3pat", "dab_detr_R_50_50ep.yaml", r"unexpected: transformer\.patterns\.weight"),
        ("R50", "dab_detr_R_50_3pat_50ep.yaml", r"missing: transformer\.patterns\.weight"),
    ],
)
def test_official_rejects_wrong_config(family, config, problem, official_file, tmp_path):
    out = tmp_path / "out.pth"
    with pytest.raises(ValueError, match=problem):
        convert_main(["--source", "official", "--config-file", _coco(config),
                      str(official_file(family)), str(out)])
    assert not out.exists()


def test_official_rejects_wrong_shapes(official_file):
    cfg = load_cfg("COCO-Detection/dab_detr_R_50_50ep.yaml", "MODEL.DAB_DETR.NUM_QUERIES", "200")
    with pytest.raises(ValueError, match=r"shape: refpoint_embed\.weight is \(300, 4\), the "
                                         r"config needs \(200, 4\)"):
        convert("official", str(official_file("R50")), cfg)


def test_official_training_checkpoint(tmp_path):
    """The official ``main.py`` saves optimizer, scheduler, epoch and its argparse
    ``Namespace`` beside the weights; all but the weights are ignored."""
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 cannot allow argparse.Namespace in weights-only loading")
    shapes = {"refpoint_embed.weight": (300, 4), "class_embed.weight": (91, 256),
              "class_embed.bias": (91,), "backbone.0.body.layer1.0.bn1.running_mean": (64,)}
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "optimizer": optimizer.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 40).state_dict(),
                "epoch": 49, "args": argparse.Namespace(lr=1e-4, backbone="resnet50",
                                                        num_queries=300, dilation=False)}, path)
    out = convert("official", str(path))
    assert set(out) == {"refpoint_embed.weight", "class_embed.weight", "class_embed.bias",
                        "backbone.res2.0.conv1.norm.running_mean"}
    torch.testing.assert_close(out["backbone.res2.0.conv1.norm.running_mean"],
                               sd["backbone.0.body.layer1.0.bn1.running_mean"], rtol=0, atol=0)


# --- torchvision ImageNet backbones ----------------------------------------------------------

TORCHVISION = {
    "R50": ("dab_detr_R_50_50ep.yaml", "resnet50", False),
    "R50-DC5": ("dab_detr_R_50_DC5_50ep.yaml", "resnet50", True),
    "R101": ("dab_detr_R_101_50ep.yaml", "resnet101", False),
}


def _random_resnet(arch: str, dc5: bool) -> torch.nn.Module:
    """A torchvision ResNet in eval mode with random weights and BN statistics."""
    net = getattr(torchvision.models, arch)(replace_stride_with_dilation=[False, False, dc5])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def _layer4(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _convert_torchvision(net: torch.nn.Module, config: str, tmp_path) -> dict:
    src, out = tmp_path / "imagenet.pth", tmp_path / "converted.pth"
    torch.save(net.state_dict(), src)
    convert_main(["--source", "torchvision", "--config-file", _coco(config), str(src), str(out)])
    sd = _load_converted(out)
    assert all(k.startswith("backbone.") for k in sd)
    return {k[len("backbone.") :]: v for k, v in sd.items()}


@pytest.mark.parametrize("variant", list(TORCHVISION))
def test_torchvision_backbone_features(variant, tmp_path):
    config, arch, dc5 = TORCHVISION[variant]
    net = _random_resnet(arch, dc5)
    sd = _convert_torchvision(net, config, tmp_path)
    cfg = load_cfg(os.path.join("COCO-Detection", config))
    backbone = build_dab_detr_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert set(sd) == set(backbone.state_dict())
    backbone.load_state_dict(sd, strict=True)

    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = _layer4(net, x)
        ours = backbone(x)["res5"]
    assert ref.shape[-2:] == ((6, 8) if dc5 else (3, 4))
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * scale)

    if dc5:
        # Detectron2's own DC5 (every res5 block dilated) computes something else: the
        # comparison above can tell the two layouts apart
        stock = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
        stock.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert (stock(x)["res5"] - ref).abs().max() > 1e-2 * scale


def test_torchvision_rejects_wrong_depth(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match=r"missing: backbone\.res4\.6\.conv1\.weight"):
        convert("torchvision", str(path), load_cfg("COCO-Detection/dab_detr_R_101_50ep.yaml"))


def test_torchvision_rejects_other_files(official_file):
    with pytest.raises(ValueError, match=r"not a torchvision ResNet .*'layer1.0.conv1.weight'"):
        convert("torchvision", str(official_file("R50")))


# --- files that would run code -----------------------------------------------------------


class _CreatesFile:
    """Unpickling this object creates ``path``: a stand-in for arbitrary code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _save_torch(obj: object, path: str) -> None:
    torch.save(obj, path)


def _save_torch_legacy(obj: object, path: str) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_pickle(obj: object, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(
    "save,name",
    [(_save_torch, "model.pth"), (_save_torch_legacy, "model.pth"), (_save_torch, "model.bin"),
     (_save_pickle, "model.pth"), (_save_pickle, "model.pkl")],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_unsafe_files_are_refused(save, name, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / name
    save({"model": {"w": np.zeros(2), "payload": _CreatesFile(str(marker))}}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refus"):
        load_state_dict_file(str(path))
    assert not marker.exists()


def test_detectron2_model_zoo_pickle_loads(tmp_path):
    arrays = {"stem.conv1.weight": np.random.rand(4, 3, 7, 7).astype(np.float32),
              "res2.0.conv1.norm.running_var": np.arange(4, dtype=np.float64)}
    path = tmp_path / "R-50.pkl"
    _save_pickle({"model": arrays, "__author__": "x", "matching_heuristics": True}, path)
    sd = load_state_dict_file(str(path))
    assert set(sd) == set(arrays)
    for k, v in arrays.items():
        torch.testing.assert_close(sd[k], torch.from_numpy(v), rtol=0, atol=0)


# --- Detectron2 checkpoints ------------------------------------------------------------------


def _batch(num_images: int = 2) -> list:
    g = torch.Generator().manual_seed(5)
    batch = []
    for h, w in [(96, 128), (112, 80)][:num_images]:
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        instances = Instances((h, w))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w / 2, h / 2])
        instances.gt_boxes = Boxes(torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], 1))
        instances.gt_classes = torch.randint(0, 5, (3,), generator=g)
        batch.append({"image": image, "instances": instances})
    return batch


@pytest.mark.parametrize("opts", [[], ["MODEL.DAB_DETR.RANDOM_REFPOINTS_XY", "True"]])
def test_detectron2_checkpoint_round_trip(opts, tmp_path):
    cfg = load_cfg("quick_schedules/dab_detr_R_18_shapes.yaml", *opts)
    model = build_model(cfg).train()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        losses = model(_batch())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(model.class_embed.weight, init["class_embed.weight"])
    assert not torch.equal(model.backbone.stem.conv1.norm.running_mean,
                           init["backbone.stem.conv1.norm.running_mean"])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")

    fresh = build_model(cfg)
    if model.refpoint_xy is not None:
        # drawn alike by every model (their own generator), and restored from the checkpoint
        assert torch.equal(fresh.refpoint_xy, model.refpoint_xy)
        fresh.refpoint_xy.add_(1.0)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))
    expected = model.state_dict()
    state = fresh.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        _assert_equal(state[k], v)

    model.eval()
    fresh.eval()
    inputs = [{"image": x["image"]} for x in _batch()]
    with torch.no_grad():
        ref = model.forward_predictions(model.preprocess_image(inputs))
        out = fresh.forward_predictions(fresh.preprocess_image(inputs))
        ref_det, out_det = model(inputs), fresh(inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(out_det, ref_det):
        a, b = a["instances"], b["instances"]
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        torch.testing.assert_close(a.pred_classes, b.pred_classes, rtol=0, atol=0)


# --- transformers files ----------------------------------------------------------------------


def test_transformers_safetensors_and_bin_agree(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    config = transformers.DabDetrConfig(
        num_labels=91, num_queries=10, num_patterns=2, hidden_size=64, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
        decoder_attention_heads=4,
    )
    config.backbone_config.backbone = "resnet18"
    hf = transformers.DabDetrForObjectDetection(config)
    hf.save_pretrained(tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors").exists()
    # a pytorch_model.bin: torch.save of the state dict, tied decoder box head included
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    converted = {}
    for name, src in [("st", tmp_path / "st"), ("bin", tmp_path / "bin"),
                      ("bin-file", tmp_path / "bin" / "pytorch_model.bin")]:
        convert_main(["--source", "transformers", str(src), str(tmp_path / f"{name}.pth")])
        converted[name] = _load_converted(tmp_path / f"{name}.pth")
    reference = converted.pop("st")
    assert "transformer.patterns.weight" in reference
    assert "backbone.res5.1.conv2.norm.running_var" in reference
    for sd in converted.values():
        assert set(sd) == set(reference)
        for k, v in reference.items():
            _assert_equal(sd[k], v)


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "dab_detr.convert", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--source" in result.stdout
    assert "{auto,dat,detrex,official,torchvision,transformers}" in result.stdout
