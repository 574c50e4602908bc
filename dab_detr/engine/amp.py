"""``SOLVER.AMP.ENABLED``: training under autocast in ``SOLVER.AMP.PRECISION``.

Detectron2's ``DefaultTrainer`` picks its ``AMPTrainer`` for AMP configs; v0.6's always
autocasts to float16 and current versions take a ``precision`` that ``DefaultTrainer`` does not
pass. :func:`autocast_trainer` puts :class:`AutocastTrainer` in its place while the trainer is
built, so that either version trains in the configured dtype:

- float16: the loss is scaled (``torch.amp.GradScaler``) and the gradients unscaled before
  the optimizer's step, so that the full-model clipping (``optimizer.py``) sees their true
  norm (Detectron2's ``AMPTrainer`` leaves that to ``GradScaler.step``, which hands a fused
  AdamW its gradients still scaled: clipped, they were 2 ** 16 times too small); a step with
  an inf or NaN gradient is skipped and the scale lowered;
- bfloat16: float32's exponent range, so no scaling (the scaler is disabled).

What stays float32 under autocast: the matcher and the set losses (the meta-architecture's
``losses`` runs the criterion with autocast off), the anchor updates
(``dab_detr.layers.box_ops.refine_boxes``) and, in the deformable attention, the sampling
locations.
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Dict

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, defaults

__all__ = ["AutocastTrainer", "autocast_dtype", "autocast_trainer"]

PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg: CfgNode) -> torch.dtype:
    """The dtype of ``SOLVER.AMP.PRECISION``, checked against ``MODEL.DEVICE``."""
    name = cfg.SOLVER.AMP.PRECISION
    if name not in PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION={name!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[name]
    device = cfg.MODEL.DEVICE
    # compute capability 8 (Ampere) or later: recent torch's is_bf16_supported() also counts
    # the emulated bfloat16 of older GPUs
    if (dtype == torch.bfloat16 and device.startswith("cuda") and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] < 8):
        raise ValueError(f"SOLVER.AMP.PRECISION='bfloat16' needs a GPU with bfloat16 (Ampere or "
                         f"later); {torch.cuda.get_device_name()} has none: use 'float16'")
    return dtype


def _grad_scaler(device: str, enabled: bool) -> Any:
    """A loss scaler for ``device``'s float16 (``torch.amp.GradScaler``: torch >= 2.3; before,
    CUDA's own)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device == "cuda")


class AutocastTrainer(AMPTrainer):
    """Detectron2's ``AMPTrainer`` with the autocast dtype given (float16 or bfloat16) and the
    model's device type (so that a CPU model runs its bfloat16 step too, as the tests do)."""

    def __init__(self, model: torch.nn.Module, data_loader: Any,
                 optimizer: torch.optim.Optimizer, precision: torch.dtype = torch.float16):
        device = next(model.parameters()).device.type
        scaler = _grad_scaler(device, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler)
        self.precision = precision
        self.device_type = device

    def run_step(self) -> None:
        """One iteration: the forward and the loss under autocast, the backward of the (scaled)
        loss, the metrics, the optimizer's step through the scaler."""
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # current Detectron2's options (v0.6 has neither)
        zero_first = getattr(self, "zero_grad_before_forward", False)
        if zero_first:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        if not zero_first:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if hasattr(self, "after_backward"):
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        # unscaled here, before the optimizer's step clips the gradients: a fused AdamW would
        # otherwise get them scaled (it unscales inside its own kernel, after the clipping)
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict: Dict) -> None:
        # AMPTrainer's, but a run resumed from a checkpoint without a scale (a float32 run's, or
        # a bfloat16 run's: a disabled scaler saves {}) starts a new one instead of failing
        super(AMPTrainer, self).load_state_dict(state_dict)
        if state_dict.get("grad_scaler") and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


@contextlib.contextmanager
def autocast_trainer(cfg: CfgNode) -> Iterator[None]:
    """While active, ``DefaultTrainer`` builds an :class:`AutocastTrainer` in
    ``SOLVER.AMP.PRECISION`` where it would build Detectron2's ``AMPTrainer``."""
    dtype = autocast_dtype(cfg) if cfg.SOLVER.AMP.ENABLED else None
    original = defaults.AMPTrainer

    def build(model: torch.nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer):
        return AutocastTrainer(model, data_loader, optimizer, precision=dtype)

    defaults.AMPTrainer = build
    try:
        yield
    finally:
        defaults.AMPTrainer = original
