"""``SOLVER.EPOCHS``: a schedule in passes over the training set, for datasets of any size.

The COCO configs give ``SOLVER.MAX_ITER`` and ``STEPS`` in iterations (50 epochs of COCO at
16 images a batch); a 500-image dataset on the same schedule would train about 11,800 epochs. With
``SOLVER.EPOCHS`` the iterations follow from the dataset and the batch instead.
"""

import logging
import math
from typing import Optional, Tuple

from detectron2.config import CfgNode

from ..data.train_dicts import load_train_dicts

__all__ = ["apply_epoch_schedule", "epoch_schedule"]

logger = logging.getLogger(__name__)


def epoch_schedule(
    epochs: int, num_images: int, batch_size: int, drop_fraction: float
) -> Tuple[int, Tuple[int, ...]]:
    """``(max_iter, steps)`` of ``epochs`` passes over ``num_images`` at ``batch_size``
    images per iteration (the last batch of a pass completed from the next), with the
    learning-rate drop at ``drop_fraction`` of the iterations (none at 1.0)."""
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"SOLVER.EPOCHS must be a non-negative integer, got {epochs!r}")
    if not 0 < drop_fraction <= 1:
        raise ValueError(f"SOLVER.LR_DROP_FRACTION must be in (0, 1], got {drop_fraction!r}")
    max_iter = epochs * math.ceil(num_images / batch_size)
    drop = round(max_iter * drop_fraction)
    return max_iter, ((drop,) if 0 < drop < max_iter else ())


def apply_epoch_schedule(cfg: CfgNode) -> Optional[str]:
    """With ``SOLVER.EPOCHS`` > 0, set ``SOLVER.MAX_ITER`` and ``SOLVER.STEPS`` of the
    (unfrozen) ``cfg`` from the size of ``DATASETS.TRAIN``; returns the line to log, or None
    when the config counts iterations itself."""
    solver = cfg.SOLVER
    if solver.EPOCHS == 0:
        return None
    num_images = len(load_train_dicts(cfg))
    old = (solver.MAX_ITER, tuple(solver.STEPS))
    solver.MAX_ITER, solver.STEPS = epoch_schedule(
        solver.EPOCHS, num_images, solver.IMS_PER_BATCH, solver.LR_DROP_FRACTION
    )
    return (
        f"SOLVER.EPOCHS {solver.EPOCHS}: {num_images} training images at "
        f"{solver.IMS_PER_BATCH} a batch ({math.ceil(num_images / solver.IMS_PER_BATCH)} "
        f"iterations an epoch) give SOLVER.MAX_ITER {solver.MAX_ITER} and SOLVER.STEPS "
        f"{solver.STEPS} (the config's {old[0]} and {old[1]} are not used)"
    )
