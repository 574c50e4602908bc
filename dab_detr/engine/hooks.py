"""Hooks that train_net's ``Trainer`` adds to Detectron2's."""

import logging

from detectron2.engine import HookBase

from .train_loader import TrainLoader

__all__ = ["TrainDataHook"]

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
