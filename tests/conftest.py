"""Shared test helpers. ``import dab_detr`` first: it prepares Detectron2's import."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dab_detr  # noqa: E402,F401
from dab_detr.config import get_dab_detr_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")


def config_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, name)


def load_cfg(name: str, *opts: str):
    """A config from ``configs/`` on CPU, without downloading pretrained weights."""
    return get_dab_detr_cfg(config_path(name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                                                *opts])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread, then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
