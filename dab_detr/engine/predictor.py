"""Inference on top of Detectron2: a config for it, a predictor whose weights load safely, and a
picture of the detections on a dataset's first images (train_net draws one after evaluating)."""

import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.env import seed_all_rng
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..checkpoint import DabDetrCheckpointer, architecture_record
from ..config import get_dab_detr_cfg
from ..data.images import read_image
from .seeding import python_random_state_kept

__all__ = ["build_predictor", "draw_detections", "setup_cfg"]

logger = logging.getLogger(__name__)


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """The frozen config of ``config_file`` with ``opts``; a CUDA device without CUDA falls
    back to the CPU with a warning."""
    cfg = get_dab_detr_cfg(config_file, list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: running on the CPU",
                       cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_predictor(cfg: CfgNode) -> DefaultPredictor:
    """Detectron2's ``DefaultPredictor`` (test-time resize, BGR input converted to
    ``INPUT.FORMAT``, one image at a time) whose weights are read by ``DabDetrCheckpointer``,
    which runs no code from a weight file; ``DefaultPredictor``'s own loader would unpickle
    a ``.pkl``."""
    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # reproducible without weights
    predictor = DefaultPredictor(cfg)
    if weights:
        DabDetrCheckpointer(predictor.model, arch=architecture_record(cfg)).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
    return predictor


def draw_detections(
    cfg: CfgNode, model: torch.nn.Module, loader: Iterable, dataset_name: str, path: str
) -> str:
    """Draw the detections of the first ``cfg.TEST.VIS_NUM_IMAGES`` images of ``loader`` (the
    test loader of ``dataset_name``), scored above ``cfg.TEST.VIS_SCORE_THRESHOLD``, with
    Detectron2's ``Visualizer`` into one PNG grid at ``path``.

    The random state of torch (CPU), numpy and ``random`` is what it was before: starting the
    loader draws a seed from torch's generator and ``Visualizer`` draws colours from numpy's,
    so without that a training run that draws after each evaluation would train on other
    random numbers (denoising noise, for one) than the same run without the picture.

    Returns:
        ``path``.
    """
    metadata = MetadataCatalog.get(dataset_name)
    panels = []
    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), python_random_state_kept(), torch.no_grad():
            for inputs in loader:
                for inp, out in zip(inputs, model(inputs)):
                    instances = out["instances"].to("cpu")
                    instances = instances[instances.scores > cfg.TEST.VIS_SCORE_THRESHOLD]
                    image = read_image(inp["file_name"], "RGB")
                    vis = Visualizer(image, metadata).draw_instance_predictions(instances)
                    panels.append(vis.get_image())
                if len(panels) >= cfg.TEST.VIS_NUM_IMAGES:
                    break
    finally:
        model.train(training)
    panels = panels[: cfg.TEST.VIS_NUM_IMAGES]
    if not panels:
        logger.warning(f"{dataset_name} has no image to draw detections on")
        return path
    cols = min(4, len(panels))
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    rows = -(-len(panels) // cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        grid[r * h : r * h + p.shape[0], c * w : c * w + p.shape[1]] = p
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
    logger.info(f"Detections of {len(panels)} images of {dataset_name} drawn to {path}")
    return path
