"""Shared test helpers. ``import dab_detr`` first: it prepares Detectron2's import."""

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dab_detr  # noqa: E402,F401
from dab_detr.config import get_dab_detr_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
# names and shapes of the official checkpoints' parameters (see tests/data/README.md)
REFERENCE = os.path.join(REPO, "tests", "data", "official_dab_detr_state_dict_keys.json")


def config_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, name)


def load_cfg(name: str, *opts: str):
    """A config from ``configs/`` on CPU, without downloading pretrained weights."""
    return get_dab_detr_cfg(config_path(name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                                                *opts])


SHAPES_CONFIG = config_path("quick_schedules/dab_detr_R_18_shapes.yaml")
# A few seconds per iteration at most: a narrow transformer on small images.
SMALL = [
    "MODEL.DAB_DETR.HIDDEN_DIM", "64", "MODEL.DAB_DETR.DIM_FEEDFORWARD", "128",
    "MODEL.DAB_DETR.NHEADS", "4", "MODEL.DAB_DETR.ENC_LAYERS", "1",
    "MODEL.DAB_DETR.DEC_LAYERS", "2", "MODEL.DAB_DETR.NUM_QUERIES", "10",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "INPUT.CROP.ENABLED", "False",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "TEST.VIS_NUM_IMAGES", "0",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "7",
]


def small_cfg(*opts: str):
    """The shapes config made SMALL, without weights."""
    return get_dab_detr_cfg(SHAPES_CONFIG, ["MODEL.WEIGHTS", "", *SMALL, *opts])


def small_model(*opts: str) -> torch.nn.Module:
    from detectron2.modeling import build_model

    return build_model(small_cfg(*opts))


def losses_by_iteration(trainer) -> dict:
    """``{iteration: total_loss}`` of a finished run."""
    return {it: v for v, it in trainer.storage.history("total_loss").values()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _dab_detr_logs_reach_caplog(monkeypatch):
    """train_net's setup gives the ``dab_detr`` logger its own handlers (Detectron2's
    ``setup_logger``), which stops propagation to the root logger that ``caplog`` listens to:
    let it propagate in tests."""
    import train_net

    def setup_logger(*args, **kwargs):
        logger = detectron2_setup_logger(*args, **kwargs)
        logger.propagate = True
        return logger

    detectron2_setup_logger = train_net.setup_logger
    monkeypatch.setattr(train_net, "setup_logger", setup_logger)
    monkeypatch.setattr(logging.getLogger("dab_detr"), "propagate", True)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread, then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
