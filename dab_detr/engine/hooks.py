"""Hooks that train_net's ``Trainer`` adds to Detectron2's, or puts in place of its own."""

import hashlib
import logging
import os
import re

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from torch import nn

from .train_loader import TrainLoader

__all__ = ["ReplicaCheckHook", "RetainingPeriodicCheckpointer", "TrainDataHook",
           "replica_mismatches"]

logger = logging.getLogger(__name__)


class TrainDataHook(HookBase):
    """Checkpoints the data order's seed and the count of skipped unreadable images; writes
    the count to the event storage when it changes and logs it after training."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self._written = 0

    def after_step(self) -> None:
        if self.loader.num_skipped != self._written:
            self._written = self.loader.num_skipped
            self.trainer.storage.put_scalar(
                "data/skipped_unreadable_images", self._written, smoothing_hint=False
            )

    def after_train(self) -> None:
        if self.loader.num_skipped:
            logger.warning(
                f"{self.loader.num_skipped} unreadable training images were skipped "
                f"(DATALOADER.SKIP_UNREADABLE_IMAGES) by this worker; the last: "
                f"{self.loader.last_skipped}"
            )

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.loader.batch_sampler.seed, "skipped_images": self.loader.num_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.loader.batch_sampler.seed = int(state_dict["seed"])
        self.loader.num_skipped = int(state_dict["skipped_images"])


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()


def replica_mismatches(model: nn.Module) -> dict[str, list[str]]:
    """The parameters and buffers (``{"parameters": names, "buffers": names}``) that are not
    bit-identical on every worker; empty lists in a single process."""
    module = getattr(model, "module", model)  # the model inside DDP
    mine = {
        kind: {name: _digest(t) for name, t in tensors}
        for kind, tensors in (("parameters", module.named_parameters()),
                              ("buffers", module.named_buffers()))
    }
    if comm.get_world_size() == 1:
        return {kind: [] for kind in mine}
    everyone = comm.all_gather(mine)
    return {kind: [n for n in mine[kind] if len({w[kind].get(n) for w in everyone}) > 1]
            for kind in mine}


class ReplicaCheckHook(HookBase):
    """In a multi-worker run, checks that every worker holds the same model: before training
    (a difference there means a tensor drawn per worker that DDP does not broadcast, e.g. a
    buffer, since Detectron2 wraps the model with ``broadcast_buffers=False``) and after it.
    Parameters that differ stop the run with their names; buffers that differ after training
    (per-worker batch-norm statistics) are reported, since only rank 0's are saved."""

    def before_train(self) -> None:
        if comm.get_world_size() == 1:
            return
        differ = replica_mismatches(self.trainer.model)
        names = differ["parameters"] + differ["buffers"]
        if names:
            raise RuntimeError(
                f"the workers start training with different values of {len(names)} tensors "
                f"(first: {names[:5]}); each would train and evaluate its own model"
            )
        logger.info(f"The model is identical on all {comm.get_world_size()} workers")

    def after_train(self) -> None:
        if comm.get_world_size() == 1:
            return
        differ = replica_mismatches(self.trainer.model)
        if differ["parameters"]:
            raise RuntimeError(
                f"after training, {len(differ['parameters'])} parameters differ between the "
                f"workers (first: {differ['parameters'][:5]})"
            )
        if differ["buffers"]:
            logger.warning(
                f"{len(differ['buffers'])} buffers differ between the workers (first: "
                f"{differ['buffers'][:5]}): per-worker statistics such as MODEL.RESNETS.NORM "
                "'BN' running averages; checkpoints hold rank 0's. 'FrozenBN' or 'SyncBN' "
                "keep them equal."
            )
        else:
            logger.info(f"The model is bit-identical on all {comm.get_world_size()} workers")


class RetainingPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer that keeps the newest ``max_to_keep`` periodic
    checkpoints (``model_final.pth`` is never deleted), counting those a resumed run finds in
    the output folder from the iterations before it."""

    def before_train(self) -> None:
        super().before_train()
        if self.max_to_keep is None:
            return
        folder = self.checkpointer.save_dir
        pattern = re.compile(rf"{re.escape(self.file_prefix)}_(\d{{7}})\.pth")
        found = sorted(
            (int(m.group(1)), f) for f in self.path_manager.ls(folder)
            if (m := pattern.fullmatch(f)) and int(m.group(1)) < self.trainer.start_iter
        ) if self.path_manager.exists(folder) else []
        self.recent_checkpoints = [os.path.join(folder, f) for _, f in found]
