"""What a newcomer meets in the first hour: the tools' ``--help`` prints no library warning,
and a misspelled key, a missing config file, dataset or weights file, or a file that is not
weights ends in one line that says what to do, not a traceback (``--debug`` keeps it)."""

import os
import subprocess
import sys

import pytest
import torch

import train_net
from conftest import REPO, SHAPES_CONFIG, SMALL
from dab_detr.checkpoint import DabDetrCheckpointer
from dab_detr.config import get_dab_detr_cfg
from dab_detr.utils.user_errors import (
    DEBUG_ENV,
    InputFileNotFoundError,
    InputValueError,
    UnknownKeyError,
    closest,
)

HELP_COMMANDS = [
    ["-m", "dab_detr.convert", "--help"],
    ["-m", "dab_detr.export", "--help"],
    ["train_net.py", "--help"],
    ["demo/demo.py", "--help"],
]


def _run(args, **env):
    """Run ``python args`` from the repository as a user's shell would: no warning filter or
    debug switch inherited from the test run."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", DEBUG_ENV)}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean, **env}, timeout=300)


@pytest.mark.parametrize("args", HELP_COMMANDS, ids=[" ".join(a[:2]) for a in HELP_COMMANDS])
def test_help_prints_no_warning(args):
    result = _run(args)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stderr == "", f"`python {' '.join(args)}` printed:\n{result.stderr}"


def _assert_one_line_error(result, *expected):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("train_net.py: error: "), result.stderr
    for text in expected:
        assert text in lines[-1], lines[-1]
    assert "--debug" in lines[-1]


def test_misspelled_key_names_the_nearest(tmp_path):
    result = _run(["train_net.py", "--config-file", SHAPES_CONFIG, "OUTPUT_DIR", str(tmp_path),
                   "MODEL.DAB_DETR.NUM_QUERYS", "10"])
    _assert_one_line_error(result, "MODEL.DAB_DETR.NUM_QUERYS is not a config key",
                           "did you mean MODEL.DAB_DETR.NUM_QUERIES?")
    assert not os.listdir(tmp_path), "nothing is started before the inputs are checked"


def test_debug_keeps_the_traceback(tmp_path):
    argv = ["train_net.py", "--config-file", SHAPES_CONFIG, "OUTPUT_DIR", str(tmp_path),
            "MODEL.DAB_DETR.NUM_QUERYS", "10"]
    for result in (_run([*argv[:1], "--debug", *argv[1:]]), _run(argv, **{DEBUG_ENV: "1"})):
        assert result.returncode == 1
        assert "Traceback" in result.stderr
        assert "UnknownKeyError: the command line: MODEL.DAB_DETR.NUM_QUERYS" in result.stderr


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "dab_detr_R_50_50pe.yaml")
    _assert_one_line_error(_run(["train_net.py", "--config-file", missing]),
                           f"config file {missing} does not exist")


def test_missing_dataset_folder(tmp_path):
    """A COCO-format dataset whose image folder is not there, and Detectron2's own COCO under
    a ``DETECTRON2_DATASETS`` that does not hold it."""
    (tmp_path / "train.json").write_text("{}")
    missing = tmp_path / "images"
    result = _run(["train_net.py", "--config-file", SHAPES_CONFIG, "OUTPUT_DIR", str(tmp_path),
                   "DATASETS.REGISTER_COCO", f"(('mine', '{tmp_path}/train.json', '{missing}'),)",
                   "DATASETS.TRAIN", "('mine',)"])
    _assert_one_line_error(result, "DATASETS.REGISTER_COCO[0] ('mine'): no image folder",
                           str(missing))
    coco = os.path.join(REPO, "configs", "COCO-Detection", "dab_detr_R_50_50ep.yaml")
    result = _run(["train_net.py", "--config-file", coco, "OUTPUT_DIR", str(tmp_path)],
                  DETECTRON2_DATASETS=str(tmp_path))
    _assert_one_line_error(result, "DATASETS.TRAIN: dataset 'coco_2017_train' has no annotation "
                           f"file {tmp_path}/coco/annotations/instances_train2017.json",
                           "DETECTRON2_DATASETS")


def test_unregistered_dataset_names_the_nearest():
    with pytest.raises(UnknownKeyError, match="did you mean dab_shapes_val?"):
        train_net.load_config(train_net.default_argument_parser().parse_args(
            ["--config-file", SHAPES_CONFIG, "DATASETS.TEST", "('dab_shapes_vall',)"]))


def test_missing_weights_are_found_before_the_workers(tmp_path):
    missing = str(tmp_path / "model_final.pth")

    def load(*flags: str):
        argv = ["--config-file", SHAPES_CONFIG, *flags, "OUTPUT_DIR", str(tmp_path),
                "MODEL.WEIGHTS", missing]
        return train_net.load_config(train_net.default_argument_parser().parse_args(argv))

    with pytest.raises(InputFileNotFoundError, match=f"MODEL.WEIGHTS: weights file {missing}"):
        load("--num-gpus", "2")
    # resuming from the run's own last checkpoint does not read MODEL.WEIGHTS
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    load("--resume")


@pytest.mark.parametrize("content", [b"not weights\n", bytes(range(256)) * 8])
def test_weights_file_that_is_not_one(tmp_path, capsys, content):
    """``--eval-only`` with a text file or random bytes as ``MODEL.WEIGHTS``, in process."""
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["--eval-only", "--config-file", SHAPES_CONFIG, *SMALL,
                       "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", str(weights)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"train_net.py: error: {weights} is not a weight file")


def test_weights_errors_name_the_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save({"model": model.state_dict()}, tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    checkpointer = DabDetrCheckpointer(model)
    with pytest.raises(InputFileNotFoundError, match="weights file .*missing.pth does not exist"):
        checkpointer.load(str(tmp_path / "missing.pth"), checkpointables=[])
    with pytest.raises(InputFileNotFoundError,
                       match="has neither model.safetensors nor pytorch_model.bin"):
        checkpointer.load(str(tmp_path), checkpointables=[])  # a folder without weights
    with pytest.raises(InputValueError, match="truncated.pth"):
        checkpointer.load(str(truncated), checkpointables=[])
    checkpointer.load(str(tmp_path / "good.pth"), checkpointables=[])  # the good file loads


def test_config_errors(tmp_path):
    def _yaml(text: str) -> str:
        (tmp_path / "bad.yaml").write_text(text)
        return str(tmp_path / "bad.yaml")

    with pytest.raises(UnknownKeyError, match=r"config file .*bad.yaml: MODEL.DAB_DETR.HIDEN_DIM "
                       r"is not a config key; did you mean MODEL.DAB_DETR.HIDDEN_DIM\?"):
        get_dab_detr_cfg(_yaml("MODEL:\n  DAB_DETR:\n    HIDEN_DIM: 64\n"))
    with pytest.raises(InputFileNotFoundError, match="_BASE_, .*nowhere.yaml, does not exist"):
        get_dab_detr_cfg(_yaml("_BASE_: nowhere.yaml\n"))
    with pytest.raises(InputValueError, match="is not valid YAML"):
        get_dab_detr_cfg(_yaml("MODEL: [\n"))
    with pytest.raises(InputValueError, match="the command line: Type mismatch"):
        get_dab_detr_cfg(SHAPES_CONFIG, ["MODEL.DAB_DETR.NUM_QUERIES", "many"])
    # the exception types are the built-in ones callers already catch
    with pytest.raises(KeyError):
        get_dab_detr_cfg(SHAPES_CONFIG, ["SOLVER.BASE_LRR", "1"])


def test_closest():
    keys = ["MODEL.DAB_DETR.NUM_QUERIES", "MODEL.DAB_DETR.NUM_PATTERNS", "SOLVER.BASE_LR",
            "MODEL.DAB_DETR.DN.NUM_GROUPS", "MODEL.RESNETS.NUM_GROUPS"]
    assert closest("MODEL.DAB_DETR.NUM_QUERYS", keys) == ["MODEL.DAB_DETR.NUM_QUERIES"]
    # a key under the wrong parent is found by its last part
    assert closest("SOLVER.NUM_QUERIES", keys) == ["MODEL.DAB_DETR.NUM_QUERIES"]
    assert closest("MODEL.DAB_DETR.DN.NUM_GROUP", keys)[0] == "MODEL.DAB_DETR.DN.NUM_GROUPS"
    assert closest("XYZ.ABC", keys) == []
