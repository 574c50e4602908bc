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
