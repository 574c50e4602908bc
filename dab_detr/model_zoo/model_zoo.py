"""Detectron2's ``detectron2.model_zoo`` functions (v0.6 signatures and behaviour) for this
project's configs and released weights.

The configs are found in the package (``dab_detr/model_zoo/configs``: a copy of ``configs/``
that setup.py puts into a wheel) or, in a source checkout or editable install, in the
repository's ``configs/`` beside the package.
"""

import os
from pathlib import Path
from typing import List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..checkpoint import DabDetrCheckpointer, architecture_record
from ..config import get_dab_detr_cfg
from ..utils.user_errors import InputFileNotFoundError, InputValueError, closest
from .released import OFFICIAL_WEIGHTS, RELEASED_WEIGHTS, UNTRAINED

__all__ = ["config_root", "get", "get_checkpoint_url", "get_config", "get_config_file"]

# configs/ of a wheel: setup.py links or copies the repository's configs/ here at build time
_PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
# configs/ of a source checkout, beside the package (recognised by its base config)
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_CONVERT = "python -m dab_detr.convert --config-file {} in.pth out.pth"


def config_root() -> Path:
    """The folder that ``config_path`` is relative to: the repository's ``configs/`` in a
    source checkout (so that edits show at once), else the package's installed copy."""
    if (_REPO_CONFIGS / "Base-DAB-DETR.yaml").is_file():
        return _REPO_CONFIGS
    return _PACKAGE_CONFIGS


def get_config_file(config_path: str) -> str:
    """The real path of a config, e.g. ``"COCO-Detection/dab_detr_R_50_50ep.yaml"``.

    Raises:
        InputFileNotFoundError: no such config; the message names the nearest ones.
    """
    root = config_root()
    cfg_file = root / config_path
    if not cfg_file.is_file():
        raise InputFileNotFoundError(
            f"{config_path} is not in the model zoo ({root}){_nearest(config_path, root)}"
        )
    return str(cfg_file)


def get_checkpoint_url(config_path: str) -> str:
    """The URL of the released weights of ``config_path``, which ``MODEL.WEIGHTS`` loads as
    they are (:data:`~dab_detr.model_zoo.released.RELEASED_WEIGHTS`).

    Raises:
        InputFileNotFoundError: no such config.
        InputValueError: no direct URL for the config; the message says where its official
            weights are published and how to use a downloaded file.
    """
    cfg_file = get_config_file(config_path)
    if config_path in RELEASED_WEIGHTS:
        return RELEASED_WEIGHTS[config_path].url
    name = os.path.basename(config_path)
    for part, why in UNTRAINED:
        if part in name:
            raise InputValueError(f"no released weights for {config_path}: {why}")
    where = next(text for prefix, text in OFFICIAL_WEIGHTS if name.startswith(prefix))
    raise InputValueError(
        f"no direct URL of weights for {config_path}: its official weights, if released, "
        f"are in the folders linked from {where}. Give the "
        "downloaded file to MODEL.WEIGHTS as it is, or convert it once with "
        f"{_CONVERT.format(cfg_file)}"
    )


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """The config of a model-zoo model, with DAB-DETR's keys.

    Args:
        config_path: relative to ``configs/``, e.g. ``"COCO-Detection/dab_detr_R_50_50ep.yaml"``.
        trained: set ``MODEL.WEIGHTS`` to the released weights (:func:`get_checkpoint_url`);
            if False, the config's own ``MODEL.WEIGHTS`` (ImageNet backbone weights) is kept.
    """
    cfg = get_dab_detr_cfg(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None) -> torch.nn.Module:
    """A model-zoo model, built and loaded with ``cfg.MODEL.WEIGHTS``, in training mode.

    Args:
        config_path, trained: see :func:`get_config`.
        device: overrides ``MODEL.DEVICE``; ``None``: the config's, or "cpu" without CUDA.

    Example::

        from dab_detr import model_zoo
        model = model_zoo.get("COCO-Detection/dab_detr_R_50_50ep.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    DabDetrCheckpointer(model, arch=architecture_record(cfg)).load(cfg.MODEL.WEIGHTS)
    return model


def _nearest(config_path: str, root: Path) -> str:
    """``"; did you mean A or B?"`` with the configs nearest ``config_path`` (by whole path,
    else by file name: a path without its folder), or ``""``."""
    known = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    stem = config_path.removesuffix(".yaml")  # closest() compares the parts after a dot
    near: List[str] = [c + ".yaml" for c in closest(stem, [k[:-5] for k in known])]
    if not near:
        by_name = {os.path.basename(k)[:-5]: k for k in known}
        near = [by_name[n] for n in closest(os.path.basename(stem), by_name)]
    return f"; did you mean {' or '.join(near)}?" if near else ""
