"""Detectron2 ``.pkl`` weight files: every pickle protocol (2 to 5), numpy 1 and numpy 2 module
names, and the layout Detectron2's ``tools/convert-torchvision-to-d2.py`` writes, loaded the way
a user does (``MODEL.WEIGHTS`` -> ``DabDetrCheckpointer.resume_or_load``); crafted pickles are
still refused."""

import builtins
import codecs
import os
import pickle
import re
import warnings
from typing import Any, Callable, Dict

import iopath.common.file_io
import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from conftest import config_path
from dab_detr.checkpoint import DabDetrCheckpointer, architecture_record
from dab_detr.checkpoint.safe_load import UnsafeCheckpointError, load_state_dict_file
from dab_detr.config import get_dab_detr_cfg

R50_CONFIG = config_path("COCO-Detection/dab_detr_R_50_50ep.yaml")
PROTOCOLS = [2, 3, 4, 5]


# --- what tools/convert-torchvision-to-d2.py writes --------------------------------------------


def d2_name(name: str) -> str:
    """The name Detectron2's converter gives a torchvision ResNet tensor: layerN -> res(N+1),
    bnN -> convN.norm, downsample.{0,1} -> shortcut(.norm), and a "stem." prefix on what is
    outside the stages (conv1, bn1 and the fc classifier, which no detector has)."""
    if "layer" not in name:
        name = f"stem.{name}"
    name = re.sub(r"layer([1-4])", lambda m: f"res{int(m[1]) + 1}", name)
    name = re.sub(r"bn([1-3])", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def write_d2_pkl(state_dict: Dict[str, torch.Tensor], path: str, protocol: int) -> None:
    """The converter's output file (it pickles with the default protocol; here, any)."""
    model = {d2_name(k): v.detach().numpy() for k, v in state_dict.items()}
    data = {"model": model, "__author__": "torchvision", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)


def test_d2_names_match_the_converter():
    assert d2_name("conv1.weight") == "stem.conv1.weight"
    assert d2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert d2_name("fc.bias") == "stem.fc.bias"
    assert d2_name("layer1.0.bn3.weight") == "res2.0.conv3.norm.weight"
    assert d2_name("layer4.2.conv2.weight") == "res5.2.conv2.weight"
    assert d2_name("layer3.0.downsample.0.weight") == "res4.0.shortcut.weight"
    assert d2_name("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"


@pytest.fixture(scope="module")
def torchvision_r50() -> Dict[str, torch.Tensor]:
    """A torchvision ResNet-50 (no download) whose batch-norm parameters and statistics are
    random too: a fresh one's (ones and zeros) would match FrozenBatchNorm2d's defaults."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return resnet.state_dict()


def load_like_train_net(weights: str, *opts: str) -> Dict[str, torch.Tensor]:
    """train_net.py's way: the config, the model it builds, MODEL.WEIGHTS loaded into it."""
    cfg = get_dab_detr_cfg(R50_CONFIG, ["MODEL.DEVICE", "cpu", *opts])
    assert cfg.MODEL.WEIGHTS == weights
    model = build_model(cfg)
    DabDetrCheckpointer(model, arch=architecture_record(cfg)).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False
    )
    return model.state_dict()


def assert_backbone_is(loaded: Dict[str, torch.Tensor], resnet: Dict[str, torch.Tensor]) -> None:
    """Every backbone tensor of the model (FrozenBatchNorm2d's weight, bias, running_mean and
    running_var included) equals the torchvision tensor it comes from."""
    expected = {
        f"backbone.{d2_name(k)}": v for k, v in resnet.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert sorted(k for k in loaded if k.startswith("backbone.")) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_converted_torchvision_pkl_loads_through_model_weights(protocol, torchvision_r50,
                                                               tmp_path):
    # the COCO configs' file name: the .pkl suffix selects Detectron2's name-matching heuristics
    path = str(tmp_path / "R-50.pkl")
    write_d2_pkl(torchvision_r50, path, protocol)
    assert_backbone_is(load_like_train_net(path, "MODEL.WEIGHTS", path), torchvision_r50)


def test_config_weights_name_is_read_from_the_download_cache(torchvision_r50, tmp_path,
                                                             monkeypatch):
    """The configs' own MODEL.WEIGHTS, offline: Detectron2's PathManager finds the file in its
    download cache ($FVCORE_CACHE) under the URL's path, as after a first download."""
    name = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    cached = tmp_path / "detectron2" / "ImageNetPretrained" / "torchvision" / "R-50.pkl"
    cached.parent.mkdir(parents=True)
    write_d2_pkl(torchvision_r50, str(cached), pickle.DEFAULT_PROTOCOL)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))

    def no_download(url: str, *args: Any, **kwargs: Any) -> str:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(iopath.common.file_io, "download", no_download)
    assert_backbone_is(load_like_train_net(name), torchvision_r50)


# --- numpy arrays in every protocol, numpy 1 and numpy 2 names ---------------------------------


def _arrays() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    return {
        "contiguous": weight,
        "fortran": np.asfortranarray(weight[0]),
        "strided": weight[:, ::2],  # neither C- nor F-contiguous: pickled another way
        "empty": np.zeros((0, 3), np.float32),  # protocol 2 stores its data as bytes()
        "float64": rng.standard_normal(5),
        "num_batches_tracked": np.array(7, np.int64),
    }


def _dump_with_numpy1_names(obj: object, path: str, protocol: int,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """pickle.dump as under numpy 1, whose functions live in numpy.core.* (numpy 2 keeps that
    module as an alias, so the pickler finds the same function under the old name)."""
    real = pickle.whichmodule

    def whichmodule(o: object, name: str) -> str:
        return re.sub(r"^numpy\._core\.", "numpy.core.", real(o, name))

    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2: numpy.core.numeric
        m.setattr(pickle, "whichmodule", whichmodule)
        with open(path, "wb") as f:
            pickle._Pickler(f, protocol).dump(obj)  # the Python pickler reads whichmodule


@pytest.mark.parametrize("numpy1_names", [False, True], ids=["numpy2-names", "numpy1-names"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_arrays_load_in_every_protocol(protocol, numpy1_names, tmp_path, monkeypatch):
    arrays = _arrays()
    path = str(tmp_path / "model.pkl")
    data = {"model": arrays, "__author__": "x", "matching_heuristics": True}
    if numpy1_names:
        _dump_with_numpy1_names(data, path, protocol, monkeypatch)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
    raw = open(path, "rb").read()
    assert (b"numpy._core" in raw) == (not numpy1_names and int(np.__version__.split(".")[0]) >= 2)
    assert (b"_codecs" in raw) == (protocol == 2)  # Python 3's bytes in a protocol-2 file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation warning when reading
        loaded = load_state_dict_file(path)
    assert sorted(loaded) == sorted(arrays)
    for k, v in arrays.items():
        torch.testing.assert_close(loaded[k], torch.from_numpy(v.copy()),
                                   rtol=0, atol=0, msg=k)


def test_out_of_band_protocol5_data_is_a_clear_error(tmp_path):
    path = str(tmp_path / "model.pkl")
    with open(path, "wb") as f:  # the arrays' data goes to the callback, not into the file
        pickle.dump({"model": _arrays()}, f, protocol=5, buffer_callback=lambda b: False)
    with pytest.raises(ValueError, match=re.escape(path) + ".*out-of-band"):
        load_state_dict_file(path)


# --- crafted pickles -------------------------------------------------------------------------


class _Call:
    """Pickles as ``func(*args)``: what a crafted weight file runs while being unpickled."""

    def __init__(self, func: Callable, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args

    def __call__(self, *args: Any) -> None:  # pickle only calls what is callable
        raise AssertionError("only pickled, never called here")


def _payloads(marker: str) -> Dict[str, object]:
    import os as os_module

    touch = f"open({marker!r}, 'w')"
    return {
        "os.system": _Call(os_module.system, f"touch {marker}"),
        "builtins.eval": _Call(builtins.eval, touch),
        # getattr(__import__("os"), "system")("touch marker")
        "getattr": _Call(_Call(builtins.getattr, _Call(builtins.__import__, "os"), "system"),
                         f"touch {marker}"),
        # _codecs.encode is let through for latin-1 only: other codecs are refused
        "codecs": _Call(codecs.encode, "payload", "rot13"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "getattr", "codecs"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_crafted_pkl_is_refused_naming_the_file(protocol, payload, tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "R-50.pkl")
    data = {"model": {"w": np.zeros(2, np.float32), "x": _payloads(marker)[payload]},
            "__author__": "torchvision", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    checkpointer = DabDetrCheckpointer(torch.nn.Linear(2, 1))
    with pytest.raises(UnsafeCheckpointError, match=re.escape(path) + ": refusing"):
        checkpointer.resume_or_load(path, resume=False)
    assert not os.path.exists(marker)
