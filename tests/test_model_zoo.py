"""``dab_detr.model_zoo``: Detectron2's model-zoo API over this project's configs. Every COCO
config is found and builds through ``get``; the released-weights table gives its URLs, only of
files whose layout the detrex and DETR references verify; other configs and unknown paths are errors
that say what to do; ``get(trained=True)`` downloads and loads the table's file (a local
server here); a wheel installs the configs with the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from detectron2.modeling import build_model
from detrex_reference import REFERENCE_DIR

# fixtures (arguments of the test that uses them: F811): iopath's cache in tmp_path, a local
# HTTP server on 127.0.0.1, detrex-layout files
from test_weights_layouts import cache, detrex_file, server  # noqa: F401

from conftest import CONFIG_DIR, REPO
from dab_detr import model_zoo
from dab_detr.checkpoint import DabDetrCheckpointer, coco_class_rows
from dab_detr.model_zoo import RELEASED_WEIGHTS
from dab_detr.utils.user_errors import InputFileNotFoundError, InputValueError
from official_reference import DETR_REFERENCE_DIR, official_state_dict

COCO_CONFIGS = sorted(p.relative_to(CONFIG_DIR).as_posix()
                      for p in Path(CONFIG_DIR, "COCO-Detection").glob("*.yaml"))
# each released file -> tests/data/<folder>/<name>.json, the names and shapes of its tensors
# that the equivalence tests load (detrex_outputs/, or detr_outputs/ for DETR's official files:
# its R50's, which the R101 files extend by ResNet blocks): a URL without one is not verified
VERIFIED_LAYOUTS = {
    "COCO-Detection/detr_R_50_500ep.yaml": "detr_r50",
    "COCO-Detection/detr_R_50_DC5_500ep.yaml": "detr_r50",
    "COCO-Detection/detr_R_101_500ep.yaml": "detr_r50",
    "COCO-Detection/detr_R_101_DC5_500ep.yaml": "detr_r50",
    "COCO-Detection/dab_detr_R_50_50ep.yaml": "dab_detr_r50",
    "COCO-Detection/dab_detr_R_50_DC5_50ep.yaml": "dab_detr_r50_dc5",
    "COCO-Detection/dab_deformable_detr_R_50_50ep.yaml": "dab_deformable_detr_r50",
    "COCO-Detection/dab_deformable_detr_R_50_two_stage_50ep.yaml":
        "dab_deformable_detr_r50_two_stage",
    "COCO-Detection/dn_dab_detr_R_50_50ep.yaml": "dn_detr_r50",
    "COCO-Detection/dn_dab_deformable_detr_R_50_50ep.yaml": "dn_deformable_detr_r50",
    # detrex's DINO files: tests/data/detrex_dino/dino_r50_4scale_keys.json (the 5-scale and
    # R101 files add an input projection and ResNet blocks of the same names)
    "COCO-Detection/dino_R_50_4scale_12ep_detrex.yaml": "dino_r50_4scale_keys",
    "COCO-Detection/dino_R_50_4scale_24ep_detrex.yaml": "dino_r50_4scale_keys",
    "COCO-Detection/dino_R_50_5scale_12ep_detrex.yaml": "dino_r50_4scale_keys",
    "COCO-Detection/dino_R_101_4scale_12ep.yaml": "dino_r50_4scale_keys",
}
DETREX_DINO_DIR = os.path.join(os.path.dirname(DETR_REFERENCE_DIR), "detrex_dino")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loads(monkeypatch) -> List[Tuple[str, dict]]:
    """The (path, architecture record) of every ``DabDetrCheckpointer.load``, which loads
    nothing: the configs' ImageNet weights are not downloaded."""
    calls: List[Tuple[str, dict]] = []

    def load(self: DabDetrCheckpointer, path: str, *args, **kwargs) -> dict:
        calls.append((path, self.arch))
        return {}

    monkeypatch.setattr(DabDetrCheckpointer, "load", load)
    return calls


def test_coco_configs_are_found():
    assert len(COCO_CONFIGS) >= 12
    for path in COCO_CONFIGS:
        assert model_zoo.get_config_file(path) == os.path.join(CONFIG_DIR, path)


@pytest.mark.parametrize("config_path", COCO_CONFIGS)
def test_get_builds_each_coco_config(config_path, loads):
    cfg = model_zoo.get_config(config_path)
    model = model_zoo.get(config_path)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert model.training
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # the config's own weights (ImageNet backbone), checked against its architecture record
    assert cfg.MODEL.WEIGHTS
    assert [path for path, _ in loads] == [cfg.MODEL.WEIGHTS]
    assert loads[0][1]["MODEL.RESNETS.RES5_DILATION"] == cfg.MODEL.RESNETS.RES5_DILATION


def test_get_on_a_given_device(loads):
    model = model_zoo.get("COCO-Detection/dab_detr_R_50_50ep.yaml", device="cpu")
    assert model.device == torch.device("cpu")


def test_released_weights_are_verified_files():
    assert sorted(RELEASED_WEIGHTS) == sorted(VERIFIED_LAYOUTS)
    for config_path, weights in RELEASED_WEIGHTS.items():
        detr = os.path.basename(config_path).startswith("detr_")
        dino = os.path.basename(config_path).startswith("dino_")
        folder = DETR_REFERENCE_DIR if detr else DETREX_DINO_DIR if dino else REFERENCE_DIR
        assert os.path.isfile(os.path.join(folder, f"{VERIFIED_LAYOUTS[config_path]}.json"))
        assert model_zoo.get_checkpoint_url(config_path) == weights.url
        assert weights.url.startswith(
            "https://dl.fbaipublicfiles.com/detr/detr-r" if detr
            else "https://github.com/IDEA-Research/detrex-storage/releases/download/v0.")
        assert model_zoo.get_config(config_path, trained=True).MODEL.WEIGHTS == weights.url
        assert 40 < weights.ap < 51


DAT_CONFIGS = [p for p in COCO_CONFIGS if "_DAT_T_" in p]


@pytest.mark.parametrize("config_path", DAT_CONFIGS)
def test_dat_configs_say_no_coco_weights_exist(config_path):
    with pytest.raises(InputValueError, match=r"no COCO model of a DAB-family detector with a "
                                              r"DAT backbone has been released"):
        model_zoo.get_checkpoint_url(config_path)


@pytest.mark.parametrize("config_path", [p for p in COCO_CONFIGS
                                         if p not in RELEASED_WEIGHTS and p not in DAT_CONFIGS])
def test_other_configs_say_where_official_weights_are(config_path):
    with pytest.raises(InputValueError) as error:
        model_zoo.get_checkpoint_url(config_path)
    message = str(error.value)
    name = os.path.basename(config_path)
    official = ("Atten4Vis/ConditionalDETR" if name.startswith("conditional_detr_")
                else "IDEA-Research/DN-DETR" if name.startswith("dn_")
                else "IDEA-Research/DINO" if name.startswith("dino_")
                else "IDEA-Research/DAB-DETR")
    assert f"https://github.com/{official}#model-zoo" in message
    assert "Give the downloaded file to MODEL.WEIGHTS as it is" in message
    assert (f"python -m dab_detr.convert --config-file {os.path.join(CONFIG_DIR, config_path)}"
            " in.pth out.pth") in message
    with pytest.raises(InputValueError):
        model_zoo.get(config_path, trained=True)


@pytest.mark.parametrize("wrong, nearest", [
    ("COCO-Detection/dab_detr_R_50_50e.yaml", "COCO-Detection/dab_detr_R_50_50ep.yaml"),
    ("dab_detr_R_50_DC5_50ep.yaml", "COCO-Detection/dab_detr_R_50_DC5_50ep.yaml"),
])
def test_unknown_config_names_the_nearest(wrong, nearest):
    for function in (model_zoo.get_config_file, model_zoo.get_checkpoint_url,
                     model_zoo.get_config, model_zoo.get):
        with pytest.raises(InputFileNotFoundError) as error:
            function(wrong)
        assert str(error.value).startswith(f"{wrong} is not in the model zoo ({CONFIG_DIR})")
        assert f"did you mean {nearest}" in str(error.value)


def test_get_trained_downloads_and_loads_the_released_file(server, cache, detrex_file,  # noqa: F811
                                                           monkeypatch):
    config_path = "COCO-Detection/dab_detr_R_50_50ep.yaml"
    source = detrex_file("dab_detr_r50")
    server.files["/v0.1.0/dab_detr_r50_50ep.pth"] = source
    url = server.url("/v0.1.0/dab_detr_r50_50ep.pth")
    monkeypatch.setitem(RELEASED_WEIGHTS, config_path,
                        RELEASED_WEIGHTS[config_path]._replace(url=url))

    model = model_zoo.get(config_path, trained=True)
    assert server.requests == ["/v0.1.0/dab_detr_r50_50ep.pth"]
    assert (cache / "v0.1.0" / "dab_detr_r50_50ep.pth").is_file()
    assert model.training
    # what MODEL.WEIGHTS loads from the file itself
    cfg = model_zoo.get_config(config_path)
    cfg.MODEL.DEVICE = str(model.device)
    expected = build_model(cfg)
    DabDetrCheckpointer(expected).load(str(source))
    torch.testing.assert_close(model.state_dict(), expected.state_dict(), rtol=0, atol=0)


def test_get_trained_loads_detr_s_official_file(server, cache, tmp_path, monkeypatch):  # noqa: F811
    """DETR's released file as its URL serves it (the official layout, rebuilt from the
    reference rule): downloaded, recognised, converted and loaded."""
    config_path = "COCO-Detection/detr_R_50_500ep.yaml"
    source = tmp_path / "detr-r50-e632da11.pth"
    sd = official_state_dict(os.path.join(DETR_REFERENCE_DIR, "detr_r50.json"))
    torch.save({"model": {k: v.float() for k, v in sd.items()}}, source)
    server.files["/detr/detr-r50-e632da11.pth"] = source
    url = server.url("/detr/detr-r50-e632da11.pth")
    monkeypatch.setitem(RELEASED_WEIGHTS, config_path,
                        RELEASED_WEIGHTS[config_path]._replace(url=url))

    model = model_zoo.get(config_path, trained=True)
    assert server.requests == ["/detr/detr-r50-e632da11.pth"]
    state = model.state_dict()
    # the 92-row COCO head (91 ids and "no object") for the config's 80 classes and "no object"
    rows = torch.as_tensor(coco_class_rows() + [91])
    torch.testing.assert_close(state["class_embed.weight"], sd["class_embed.weight"][rows].float())
    torch.testing.assert_close(state["query_embed.weight"], sd["query_embed.weight"].float())
    torch.testing.assert_close(state["backbone.res5.2.conv3.weight"],
                               sd["backbone.0.body.layer4.2.conv3.weight"].float())


def test_wheel_installs_the_configs(tmp_path):
    """A wheel (built from a copy of the sources, so that setup.py's link stays out of the
    checkout) holds configs/ in the package, and the installed package finds them there."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "configs")  # the package's link, if any
    shutil.copytree(Path(REPO, "dab_detr"), source / "dab_detr", ignore=ignore)
    shutil.copytree(CONFIG_DIR, source / "configs")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(Path(REPO, name), source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                          str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("dab_detr-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"),
                          str(wheel)], check=True, cwd=tmp_path)
    script = ("from dab_detr import model_zoo; "
              "print(model_zoo.get_config_file('COCO-Detection/dab_detr_R_50_50ep.yaml')); "
              "print(model_zoo.get_config('COCO-Detection/dn_dab_detr_R_50_DC5_50ep.yaml')"
              ".MODEL.RESNETS.RES5_DILATION)")
    # -P: not the current folder first; PYTHONPATH before the editable install's finder
    run = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    config_file, dilation = run.stdout.split()
    installed = tmp_path / "site" / "dab_detr" / "model_zoo" / "configs"
    assert config_file == str(installed / "COCO-Detection" / "dab_detr_R_50_50ep.yaml")
    assert dilation == "2"  # merged with both _BASE_ files, from the installed copy
    assert sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*.yaml")) == \
        sorted(p.relative_to(CONFIG_DIR).as_posix() for p in Path(CONFIG_DIR).rglob("*.yaml"))
