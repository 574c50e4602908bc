"""An exponential moving average of the model's weights, evaluated and saved in their place.

With ``MODEL_EMA.ENABLED``, train_net keeps ``w_ema <- DECAY * w_ema + (1 - DECAY) * w`` over
every parameter and floating-point buffer (batch-norm statistics included) after each
iteration, with torch's :class:`~torch.optim.swa_utils.AveragedModel`. The key names are
d2go's ``MODEL_EMA`` (the checkpoint layout below is this project's own); detrex's DINO
configs train with such an average too. Checkpoints hold the weights twice. The first update
copies the model; there is no warm-up of the decay, so in runs much shorter than
``1 / (1 - DECAY)`` iterations the average still holds much of the initialisation.

- Evaluations during and after training score the averaged model.
- A checkpoint's ``"model"`` holds the averaged weights, so ``--eval-only``, the demo, the
  predictor, export and a fine-tuning run's ``MODEL.WEIGHTS`` all use what was evaluated,
  with Detectron2's plain ``DetectionCheckpointer`` too. The weights being trained are kept
  beside them under ``"training_model"``, which only ``--resume`` reads
  (:class:`~dab_detr.checkpoint.DabDetrCheckpointer`); resuming such a file with
  ``MODEL_EMA`` off continues from the trained weights and drops the average, with a warning.
"""

from typing import Optional

import torch
from detectron2.engine import HookBase
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMAHook", "build_model_ema", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or ``model`` itself)."""
    return getattr(model, "module", model)


def _ema_update(decay: float):
    """``AveragedModel``'s per-tensor ``avg_fn`` (torch 2.0 has no ``multi_avg_fn``)."""

    def update(averaged: torch.Tensor, current: torch.Tensor, _num_averaged) -> torch.Tensor:
        if averaged.is_floating_point():
            return averaged.lerp(current, 1.0 - decay)
        return current  # integer buffers (batch norm's num_batches_tracked): the model's count

    return update


def build_model_ema(cfg, model: nn.Module) -> Optional[AveragedModel]:
    """The averaged copy of ``model`` that ``cfg.MODEL_EMA`` asks for, or ``None``.

    Raises:
        ValueError: ``MODEL_EMA.DECAY`` is not in [0, 1), or ``TEST.PRECISE_BN`` is on too.
    """
    if not cfg.MODEL_EMA.ENABLED:
        return None
    decay = cfg.MODEL_EMA.DECAY
    if not isinstance(decay, float) or not 0.0 <= decay < 1.0:
        raise ValueError(f"MODEL_EMA.DECAY must be a number in [0, 1), got {decay!r}")
    if cfg.TEST.PRECISE_BN.ENABLED:
        raise ValueError("MODEL_EMA.ENABLED with TEST.PRECISE_BN.ENABLED: PreciseBN would "
                         "recompute the statistics of the trained model, not of the average "
                         "that is evaluated and saved; turn one of them off")
    return AveragedModel(unwrap(model), avg_fn=_ema_update(decay), use_buffers=True)


class EMAHook(HookBase):
    """Updates the average after every iteration (before the checkpointer and the evaluation
    hooks see it)."""

    def __init__(self, ema: AveragedModel):
        self.ema = ema

    def after_step(self) -> None:
        self.ema.update_parameters(unwrap(self.trainer.model))
