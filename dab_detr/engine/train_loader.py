"""The training data loader of train_net's ``Trainer``, which a resumed run continues exactly:
batches from :class:`~dab_detr.engine.sampler.ResumableBatchSampler`, each sample augmented
under its own seed (:mod:`dab_detr.engine.seeding`), unreadable images counted."""

from collections.abc import Callable, Iterator
from typing import Any

import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm

from ..data.train_dicts import load_train_dicts
from .sampler import ResumableBatchSampler, index_stream
from .seeding import SKIPPED_KEY, SeededMapDataset

__all__ = ["TrainLoader", "build_train_loader", "restart_data_loader"]


class TrainLoader:
    """Iterable of per-rank batches (lists of mapped dicts) that counts skipped images."""

    def __init__(self, data_loader: torchdata.DataLoader):
        self.data_loader = data_loader
        self.batch_sampler: ResumableBatchSampler = data_loader.batch_sampler
        self.num_skipped = 0
        self.last_skipped: str | None = None

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        for batch in self.data_loader:
            for sample in batch:
                skipped = sample.pop(SKIPPED_KEY, [])
                self.num_skipped += len(skipped)
                self.last_skipped = skipped[-1] if skipped else self.last_skipped
            yield batch



def build_train_loader(cfg: CfgNode, mapper: Callable) -> TrainLoader:
    """The training loader of ``cfg`` with ``mapper``: see the module docstrings of
    ``sampler`` and ``seeding``.

    Keys read: ``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.*``,
    ``MODEL.DAB_DETR.NUM_CLASSES``.
    """
    dataset_dicts = load_train_dicts(cfg)
    landscape = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        landscape = [d.get("width", 0) > d.get("height", 0) for d in dataset_dicts]
    sampler = ResumableBatchSampler(
        index_stream(cfg, dataset_dicts),
        cfg.SOLVER.IMS_PER_BATCH,
        seed=comm.shared_random_seed(),  # Detectron2's TrainingSampler default
        landscape=landscape,
    )
    loader = torchdata.DataLoader(
        SeededMapDataset(dataset_dicts, mapper),
        batch_sampler=sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )
    return TrainLoader(loader)


def restart_data_loader(trainer: Any) -> None:
    """Make a ``SimpleTrainer`` take its next batch from a new iterator of its data loader."""
    loader = trainer.data_loader
    if hasattr(trainer, "reset_data_loader"):
        # Detectron2 > 0.6: public, and the iterator is created on first use
        trainer.reset_data_loader(lambda: loader)
    else:
        trainer._data_loader_iter = iter(loader)  # Detectron2 0.6 creates it eagerly

