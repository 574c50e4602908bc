"""``MODEL.WEIGHTS`` takes released weights as they are: a file in each layout (this project's,
official, transformers, detrex, torchvision) loads through ``DabDetrCheckpointer`` as its
conversion would, a file of no known layout is refused naming its tensors, weights at an http
URL are downloaded once into iopath's cache (a local server here), a crafted pickle there is
refused without running, and a detrex COCO checkpoint fine-tunes on a dataset of 5 classes.

The detrex files are the equivalence tests' (``detrex_reference.py``): detrex's exact names and
shapes. The other files come from small models, renamed to the layout by this file's own
spelling of its names (official) or written by the library itself (transformers, torchvision).
"""

import argparse
import http.server
import logging
import os
import pickle
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
import torchvision
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from detrex_reference import REFERENCE_DIR, detrex_checkpoint, detrex_state_dict
from iopath.common.file_io import HTTPURLHandler

import train_net
from conftest import SMALL, config_path, small_cfg, small_model, write_coco_dataset
from dab_detr.checkpoint import DabDetrCheckpointer, architecture_record, coco_class_rows, convert
from dab_detr.convert import main as convert_main
from dab_detr.utils.user_errors import InputFileNotFoundError, InputValueError

# detrex model -> this project's config for it
DETREX_CONFIGS = {
    "dab_detr_r50": config_path("COCO-Detection/dab_detr_R_50_50ep.yaml"),
    "dn_detr_r50": config_path("COCO-Detection/dn_dab_detr_R_50_50ep.yaml"),
}
# torchvision's ResNet-18 (transformers' too): full width, up to res5; the small configs' is
# half as wide and stops at res3
R18_RES5 = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "64", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
            "MODEL.RESNETS.OUT_FEATURES", "['res5']", "MODEL.RESNETS.NORM", "FrozenBN"]
StateDict = Dict[str, torch.Tensor]

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detrex_file(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """``detrex_file(model)``: a checkpoint as detrex's training writes it (~170 MB, written
    once per model, removed after the module)."""
    folder = tmp_path_factory.mktemp("detrex")
    paths: Dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in paths:
            sd = detrex_state_dict(os.path.join(REFERENCE_DIR, f"{model}.json"))
            paths[model] = folder / f"{model}.pth"
            torch.save(detrex_checkpoint(sd), paths[model])
        return paths[model]

    yield get
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path) -> Iterator[Path]:
    """``tmp_path``, removed after the test: the R50 weight files and checkpoints written
    there take ~170-500 MB each."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """iopath's download cache in ``tmp_path``, and no URL remembered by this process: the
    user's cache is not touched, and a download is found only where a new run would find it."""
    folder = tmp_path / "iopath_cache"
    monkeypatch.setenv("FVCORE_CACHE", str(folder))
    _forget_downloads(monkeypatch)
    return folder


def _forget_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty the URL -> file map that iopath's HTTP handler keeps in memory (restored after
    the test), so that a download is found in the cache folder or not at all."""
    for handler in PathManager._path_handlers.values():
        if isinstance(handler, HTTPURLHandler):
            monkeypatch.setattr(handler, "cache_map", {})


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> file) and records every request's path."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.files: Dict[str, Path] = {}
        self.requests: List[str] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        path = self.server.files.get(self.path)
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile)

    def log_message(self, *args) -> None:
        pass  # not to stderr


@pytest.fixture
def server(cache, monkeypatch) -> Iterator[_Server]:
    """A local HTTP server on 127.0.0.1 (any free port), stopped after the test."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def checkpoint_log() -> Iterator[List[str]]:
    """What the checkpointer logs (fvcore's logger, which Detectron2's setup stops from
    propagating to caplog)."""
    logger = logging.getLogger("fvcore.common.checkpoint")
    level, handler = logger.level, _Messages()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _assert_state(model: torch.nn.Module, expected: StateDict, skip: Tuple[str, ...] = ()) -> None:
    """Every tensor of ``model`` but BatchNorm's counters and those starting with ``skip``
    is ``expected``'s, exactly."""
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked") and not k.startswith(skip)}
    assert sorted(state) == sorted(k for k in expected if not k.endswith("num_batches_tracked")
                                   and not k.startswith(skip))
    for k, v in state.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


def _converted(path: Path, out: Path) -> StateDict:
    """``path`` converted by ``python -m dab_detr.convert`` (``--source auto``, its default)."""
    convert_main([str(path), str(out)])
    return torch.load(out, map_location="cpu", weights_only=True)["model"]


# --- each layout, as it is -------------------------------------------------------------------


def _torchvision_name(name: str) -> str:
    """A Detectron2 ResNet tensor's name (after ``backbone.``) as torchvision spells it:
    stem.conv1 -> conv1 (its norm bn1), resN -> layer(N-1), convK.norm -> bnK, shortcut and
    its norm -> downsample.0 and .1."""
    name = re.sub(r"^stem\.conv1\.norm\.", "bn1.", name).removeprefix("stem.")
    name = re.sub(r"^res(\d)", lambda m: f"layer{int(m[1]) - 1}", name)
    name = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", name)
    return name.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")


def _own(tmp_path: Path) -> Tuple[Path, List[str], StateDict]:
    """A checkpoint this project's training writes."""
    source = small_model()
    DabDetrCheckpointer(source, str(tmp_path)).save("model_final")
    return tmp_path / "model_final.pth", [], source.state_dict()


def _official(tmp_path: Path, fixed_anchor_centres: bool) -> Tuple[Path, List[str], StateDict]:
    """The official layout: the ResNet in torchvision's names under ``backbone.0.body.``, a
    91-row class head indexed by COCO category id (for an 80-class model), and the anchors
    whole (the fixxy configs keep their centres apart)."""
    opts = ["MODEL.DAB_DETR.NUM_CLASSES", "80"]
    source = small_model(*opts).state_dict()
    sd = {("backbone.0.body." + _torchvision_name(k[len("backbone."):])
           if k.startswith("backbone.") else k): v for k, v in source.items()}
    for name in ("class_embed.weight", "class_embed.bias"):
        sd[name] = torch.randn(91, *source[name].shape[1:])
        sd[name][coco_class_rows()] = source[name]
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "epoch": 49}, path)
    expected = dict(source)
    if fixed_anchor_centres:
        opts += ["MODEL.DAB_DETR.RANDOM_REFPOINTS_XY", "True"]
        anchors = expected["refpoint_embed.weight"]
        expected["refpoint_xy"], expected["refpoint_embed.weight"] = anchors[:, :2], anchors[:, 2:]
    return path, opts, expected


def _transformers(tmp_path: Path) -> Tuple[Path, List[str], StateDict]:
    """``DabDetrForObjectDetection.save_pretrained``'s safetensors file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    config = transformers.DabDetrConfig(
        num_labels=5, num_queries=10, num_patterns=0, hidden_size=64, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
        decoder_attention_heads=4,
    )
    config.backbone_config.backbone = "resnet18"
    transformers.DabDetrForObjectDetection(config).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    # the CLI's conversion, checked to fill the model the config builds
    return path, R18_RES5, convert("transformers", str(path), small_cfg(*R18_RES5))


def _torchvision(tmp_path: Path) -> Tuple[Path, List[str], StateDict]:
    """An ImageNet ResNet-18 as torchvision saves it (random, batch-norm statistics too): the
    backbone's tensors only."""
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    return path, R18_RES5, convert("torchvision", str(path), small_cfg(*R18_RES5))


def _folder_of(path: Path, opts: List[str], expected: StateDict):
    return path.parent, opts, expected


# case -> (layout logged, how its file is made)
LAYOUT_FILES = {
    "dab_detr": ("dab_detr", _own),
    "official": ("official", lambda tmp: _official(tmp, fixed_anchor_centres=False)),
    "official-fixxy": ("official", lambda tmp: _official(tmp, fixed_anchor_centres=True)),
    "transformers": ("transformers", _transformers),
    # the folder save_pretrained wrote, as a user passes it
    "transformers-folder": ("transformers", lambda tmp: _folder_of(*_transformers(tmp))),
    "torchvision": ("torchvision", _torchvision),
}


@pytest.mark.parametrize("case", list(LAYOUT_FILES))
def test_each_layout_loads_through_model_weights(case, tmp_path, checkpoint_log):
    """train_net's way (the config's MODEL.WEIGHTS into the model it builds): every tensor is
    the file's, converted; the log says which layout was read."""
    layout, make = LAYOUT_FILES[case]
    path, opts, expected = make(tmp_path)
    cfg = small_cfg(*opts, "MODEL.WEIGHTS", str(path))
    model = build_model(cfg)
    if layout == "torchvision":  # the rest keeps its initialisation
        assert all(k.startswith("backbone.") for k in expected)
        expected = {**{k: v.clone() for k, v in model.state_dict().items()}, **expected}
    DabDetrCheckpointer(model, arch=architecture_record(cfg)).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False
    )
    _assert_state(model, expected)
    done = "loaded as it is" if layout == "dab_detr" else "converted"
    assert any(m.startswith(f"{path}: {layout} layout, {done}") for m in checkpoint_log)


def test_unknown_layout_is_refused_naming_its_tensors(tmp_path):
    # a Faster R-CNN's names, and one of this project's
    names = ["backbone.bottom_up.stem.conv1.weight", "backbone.fpn_lateral2.weight",
             "proposal_generator.rpn_head.conv.weight", "roi_heads.box_head.fc1.weight",
             "roi_heads.box_predictor.cls_score.weight", "class_embed.weight",
             "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"]
    path = tmp_path / "model_final_280758.pth"
    torch.save({"model": {k: torch.zeros(2) for k in names}}, path)
    unfit = [k for k in names if k != "class_embed.weight"]
    listed = re.escape(", ".join(unfit[:5]) + " and 2 more") + " fit none"
    with pytest.raises(InputValueError, match=re.escape(str(path)) + ".*" + listed):
        DabDetrCheckpointer(small_model()).load(str(path))
    out = tmp_path / "out.pth"
    with pytest.raises(InputValueError, match=listed):
        convert_main([str(path), str(out)])
    assert not out.exists()


def test_convert_auto_refuses_this_projects_own_layout(tmp_path):
    path, _, _ = _own(tmp_path)
    with pytest.raises(InputValueError, match="already in this project's names"):
        convert_main([str(path), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


# --- weights at a URL --------------------------------------------------------------------------


def _eval_only_args(config: str, weights: str, output_dir: Path) -> argparse.Namespace:
    """``train_net.py --eval-only`` of ``config`` with ``weights``, without a test set."""
    return default_argument_parser().parse_args(
        ["--eval-only", "--config-file", config, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights,
         "DATASETS.TEST", "()", "OUTPUT_DIR", str(output_dir)]
    )


def test_detrex_weights_at_a_url_are_downloaded_once(server, cache, detrex_file, scratch,
                                                     monkeypatch, checkpoint_log):
    """``train_net.py --eval-only MODEL.WEIGHTS http://...`` with a detrex file: downloaded
    into the cache, converted while loading (the model holds what ``python -m
    dab_detr.convert`` writes), and read from the cache by the next run."""
    source = detrex_file("dab_detr_r50")
    server.files["/releases/dab_detr_r50.pth"] = source
    url = server.url("/releases/dab_detr_r50.pth")
    expected = _converted(source, scratch / "converted.pth")
    built: List[torch.nn.Module] = []
    build = train_net.Trainer.build_model

    def build_and_keep(cls: type, cfg: CfgNode) -> torch.nn.Module:
        built.append(build(cfg))
        return built[-1]

    monkeypatch.setattr(train_net.Trainer, "build_model", classmethod(build_and_keep))
    args = _eval_only_args(DETREX_CONFIGS["dab_detr_r50"], url, scratch / "out")
    train_net.main(args)
    assert server.requests == ["/releases/dab_detr_r50.pth"]
    assert (cache / "releases" / "dab_detr_r50.pth").is_file()
    assert f"{url}: detrex layout, converted" in checkpoint_log
    _assert_state(built[0], expected)

    # a second run, as a new process would: from the cache, no request
    _forget_downloads(monkeypatch)
    train_net.main(args)
    assert server.requests == ["/releases/dab_detr_r50.pth"]
    _assert_state(built[1], expected)


class _CreatesFile:
    """Unpickling this object creates ``path``: a stand-in for arbitrary code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["model_final.pth", "R-50.pkl"])
def test_crafted_pickle_at_a_url_is_refused(name, server, tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted = tmp_path / name
    data = {"model": {"w": torch.zeros(2), "x": _CreatesFile(str(marker))}, "__author__": "x"}
    if name.endswith(".pkl"):
        with open(crafted, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, crafted)
    server.files[f"/{name}"] = crafted
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["--eval-only", "--config-file", config_path(
            "quick_schedules/dab_detr_R_18_shapes.yaml"), *SMALL, "MODEL.WEIGHTS",
            server.url(f"/{name}"), "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("train_net.py: error: ")]
    assert len(errors) == 1 and name in errors[0] and "refusing" in errors[0], errors
    assert server.requests == [f"/{name}"]
    assert not marker.exists()


def test_url_that_cannot_be_downloaded_is_named(server):
    url = server.url("/missing.pth")
    with pytest.raises(InputFileNotFoundError, match=re.escape(url) + ".*404"):
        DabDetrCheckpointer(torch.nn.Linear(2, 1)).load(url)


# --- fine-tuning a detrex COCO checkpoint --------------------------------------------------------


@pytest.mark.parametrize("model_name", list(DETREX_CONFIGS))
def test_detrex_checkpoint_fine_tunes_on_other_classes(model_name, detrex_file, scratch,
                                                        checkpoint_log):
    """80 COCO classes in the file, 5 in the dataset: everything but the class head (and DN's
    label embedding) is the file's, and one training step runs."""
    source = detrex_file(model_name)
    expected = _converted(source, scratch / "converted.pth")
    json_file = write_coco_dataset(str(scratch / "data"), "train", num_images=2, seed=0)
    split = f"('ft_{model_name}', '{json_file}', '{scratch / 'data' / 'train'}')"
    opts = [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(source), "MODEL.DAB_DETR.NUM_CLASSES", "5",
        "DATASETS.REGISTER_COCO", f"({split},)", "DATASETS.TRAIN", f"('ft_{model_name}',)",
        "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.CROP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "0", "TEST.VIS_NUM_IMAGES", "0", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(scratch / "out"),
    ]
    args = default_argument_parser().parse_args(
        ["--config-file", DETREX_CONFIGS[model_name], *opts])
    trainer = train_net.Trainer(train_net.setup(args))
    model = trainer.model
    heads = ("class_embed.", "label_enc.")
    init = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(heads)}
    assert model.class_embed.weight.shape[0] == 5
    trainer.resume_or_load(resume=False)

    _assert_state(model, expected, skip=heads)
    for k, v in init.items():  # not loaded: another class count
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert f"{source}: detrex layout, converted" in checkpoint_log
    dropped = ["class_embed.bias", "class_embed.weight"]
    dropped += ["label_enc.weight"] if model_name == "dn_detr_r50" else []
    assert sorted(init) == dropped
    assert any("class head for 80 classes, the model 5" in m and ", ".join(dropped) in m
               for m in checkpoint_log)

    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0][0]))
    # the step trained the new head
    assert not torch.equal(model.class_embed.weight, init["class_embed.weight"])
