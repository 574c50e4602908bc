"""What ``train_net.py`` adds to Detectron2's trainer, one concern per module: batches a
resumed run continues (``sampler``), per-sample augmentation seeds (``seeding``), the loader
(``train_loader``), hooks, the optimizer, inference helpers (``predictor``) and the
``Trainer`` that puts them together (with the NaN stop)."""

from .hooks import TrainDataHook
from .launch import launch
from .optimizer import build_optimizer, optimizer_param_groups
from .predictor import build_predictor, draw_detections, setup_cfg
from .sampler import ResumableBatchSampler
from .schedule import apply_epoch_schedule, epoch_schedule
from .train_loader import TrainLoader, build_train_loader, restart_data_loader
from .trainer import Trainer

__all__ = [
    "ResumableBatchSampler",
    "TrainDataHook",
    "TrainLoader",
    "Trainer",
    "apply_epoch_schedule",
    "build_optimizer",
    "build_predictor",
    "build_train_loader",
    "draw_detections",
    "epoch_schedule",
    "launch",
    "optimizer_param_groups",
    "restart_data_loader",
    "setup_cfg",
]
