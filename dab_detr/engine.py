"""A training data loader that a resumed run continues exactly, for train_net's ``Trainer``.

Detectron2's loader restarts its ``TrainingSampler`` stream on ``--resume`` and draws the
augmentations from the ``np.random`` of data-loader workers seeded anew at each start, so a
resumed run trains on other images, augmented otherwise, than the run it continues. Here:

- :class:`ResumableBatchSampler` cuts the sampler's seeded index stream into global batches of
  ``SOLVER.IMS_PER_BATCH`` (grouped by aspect ratio like Detectron2's, from the dataset's
  ``width``/``height``), so batch ``i`` depends on the seed and ``i`` only and the sampler can
  start at any iteration; rank ``r`` of ``W`` takes slots ``[r * B / W, (r + 1) * B / W)``.
- each sample is mapped under ``np.random`` (and ``random``) seeded from ``(seed, iteration,
  slot)``: its augmentation does not depend on the number of workers, on the world size, or on
  where the run started. An unreadable image (the mapper returns ``None``) is replaced by
  another drawn from that same seeded stream, and counted.
- :class:`TrainDataHook` checkpoints the seed and the count of skipped images, and reports it.
"""

import contextlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .data import check_num_classes
from .data.annotations import check_annotations

__all__ = [
    "ResumableBatchSampler",
    "TrainDataHook",
    "TrainLoader",
    "build_train_loader",
    "load_train_dicts",
    "restart_data_loader",
]

logger = logging.getLogger(__name__)

# (seed, iteration, slot in the global batch): seeds the augmentation of one sample
SampleSeed = tuple[int, int, int]
# Set by the dataset on a mapped sample that replaced unreadable images; TrainLoader removes it.
_SKIPPED_KEY = "_dab_detr_skipped_files"
# Unreadable images drawn in a row before giving up: the image folder is probably wrong.
_MAX_CONSECUTIVE_SKIPS = 100


class ResumableBatchSampler(torchdata.Sampler):
    """Per-rank batches of ``(dataset index, sample seed)`` from global batches that are a
    function of ``seed`` and the iteration only. Set ``start_iter`` and ``seed`` before
    iterating (a resumed run does)."""

    def __init__(
        self,
        make_indices: Callable[[int], Iterator[int]],
        total_batch_size: int,
        seed: int,
        landscape: Sequence[bool] | None = None,
    ):
        """
        Args:
            make_indices: ``seed -> `` the infinite stream of dataset indices to train on, the
                same on every rank (a Detectron2 sampler's un-sharded stream).
            total_batch_size: B, images per iteration over all ranks.
            seed: seed of the index stream and of the augmentations.
            landscape: per dataset index, whether the image is wider than tall; batches then
                hold images of one orientation. ``None``: no grouping.
        """
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                f"number of workers ({world_size})"
            )
        self.make_indices = make_indices
        self.total_batch_size = total_batch_size
        self.seed = seed
        self.landscape = landscape
        self.start_iter = 0
        self.rank = comm.get_rank()
        self.batch_size = total_batch_size // world_size

    def global_batches(self, seed: int) -> Iterator[list[int]]:
        """The global batches of B dataset indices, from iteration 0."""
        buckets: tuple[list[int], list[int]] = ([], [])
        for index in self.make_indices(seed):
            bucket = buckets[int(self.landscape is not None and bool(self.landscape[index]))]
            bucket.append(index)
            if len(bucket) == self.total_batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list[tuple[int, SampleSeed]]]:
        seed, start = self.seed, self.start_iter  # read once: the stream must not change
        lo = self.rank * self.batch_size
        batches = itertools.islice(self.global_batches(seed), start, None)
        for iteration, batch in enumerate(batches, start=start):
            mine = batch[lo : lo + self.batch_size]
            yield [(index, (seed, iteration, lo + j)) for j, index in enumerate(mine)]


@contextlib.contextmanager
def _seeded_random(seed: SampleSeed) -> Iterator[None]:
    """Seed ``np.random`` and ``random`` (Detectron2's augmentations draw from them) for one
    sample, and give the caller back its own random state afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(list(seed))
    random.seed(repr(seed))  # a str seed is hashed with SHA-512: the same in every process
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _SeededMapDataset(torchdata.Dataset):
    """``dataset[(index, seed)]`` maps dict ``index`` under randomness seeded by ``seed``."""

    def __init__(self, dataset_dicts: list[dict[str, Any]], mapper: Callable):
        self.dicts = DatasetFromList(dataset_dicts, copy=False)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, key: tuple[int, SampleSeed]) -> dict[str, Any]:
        index, seed = key
        skipped = []
        with _seeded_random(seed):
            while len(skipped) < _MAX_CONSECUTIVE_SKIPS:
                record = self.dicts[index]
                mapped = self.mapper(record)
                if mapped is not None:
                    if skipped:
                        mapped[_SKIPPED_KEY] = skipped
                    return mapped
                skipped.append(record["file_name"])
                index = int(np.random.randint(len(self.dicts)))  # seeded: reproducible
        raise RuntimeError(
            f"{len(skipped)} training images in a row could not be read (the last: "
            f"{skipped[-1]}); check the dataset's image folder"
        )


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
                skipped = sample.pop(_SKIPPED_KEY, [])
                self.num_skipped += len(skipped)
                self.last_skipped = skipped[-1] if skipped else self.last_skipped
            yield batch


def load_train_dicts(cfg: CfgNode) -> list[dict[str, Any]]:
    """The dicts of ``DATASETS.TRAIN``, each dataset checked against the model's classes and
    by :func:`~dab_detr.data.annotations.check_annotations`; images without non-crowd boxes are
    removed when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``."""
    num_classes = cfg.MODEL.DAB_DETR.NUM_CLASSES
    dataset_dicts = []
    for name in cfg.DATASETS.TRAIN:
        try:
            loaded = get_detection_dataset_dicts([name], filter_empty=False)
        except KeyError as e:  # load_coco_json: a category id missing from 'categories'
            raise _unknown_category_error(name, e) from e
        check_num_classes(num_classes, [name])  # known now; a clearer error than per box
        dataset_dicts += check_annotations(loaded, num_classes, name)
    if len(cfg.DATASETS.TRAIN) > 1:  # same classes in the same order, as Detectron2 checks
        check_metadata_consistency("thing_classes", cfg.DATASETS.TRAIN)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if not dataset_dicts:
        raise ValueError(f"DATASETS.TRAIN {cfg.DATASETS.TRAIN} has no image to train on")
    return dataset_dicts


def _unknown_category_error(name: str, error: KeyError) -> Exception:
    """Name the json file and the annotations whose category is not among its categories."""
    json_file = MetadataCatalog.get(name).get("json_file")
    if not json_file:
        return error
    with PathManager.open(json_file) as f:
        data = json.load(f)
    known = sorted(c["id"] for c in data.get("categories", []))
    bad = [a for a in data.get("annotations", []) if a.get("category_id") not in set(known)]
    if not bad:
        return error
    shown = "; ".join(
        f"annotation id {a.get('id')} of image id {a.get('image_id')}: category_id "
        f"{a.get('category_id')}"
        for a in bad[:5]
    )
    return ValueError(
        f"dataset {name!r} ({json_file}): {len(bad)} annotation(s) have a category_id that is "
        f"not among the json's categories {known}: {shown}{'; ...' if len(bad) > 5 else ''}"
    )


def _index_stream(cfg: CfgNode, dataset_dicts: list[dict]) -> Callable[[int], Iterator[int]]:
    """``seed ->`` the un-sharded index stream of the sampler ``DATALOADER.SAMPLER_TRAIN``."""
    name, size = cfg.DATALOADER.SAMPLER_TRAIN, len(dataset_dicts)
    logger.info(f"Using training sampler {name} (resumable batches)")
    if name == "TrainingSampler":
        return lambda seed: TrainingSampler(size, seed=seed)._infinite_indices()
    if name == "RepeatFactorTrainingSampler":
        # DATALOADER.REPEAT_SQRT exists in Detectron2 after v0.6 only
        sqrt = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, **sqrt
        )
        return lambda seed: RepeatFactorTrainingSampler(factors, seed=seed)._infinite_indices()
    if name == "RandomSubsetTrainingSampler":
        ratio = cfg.DATALOADER.RANDOM_SUBSET_RATIO
        return lambda seed: RandomSubsetTrainingSampler(
            size, ratio, seed_shuffle=seed, seed_subset=seed
        )._infinite_indices()
    raise ValueError(f"Unknown training sampler: {name}")


def build_train_loader(cfg: CfgNode, mapper: Callable) -> TrainLoader:
    """The training loader of ``cfg`` with ``mapper``: see the module docstring.

    Keys read: ``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.*``,
    ``MODEL.DAB_DETR.NUM_CLASSES``.
    """
    dataset_dicts = load_train_dicts(cfg)
    landscape = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        landscape = [d.get("width", 0) > d.get("height", 0) for d in dataset_dicts]
    sampler = ResumableBatchSampler(
        _index_stream(cfg, dataset_dicts),
        cfg.SOLVER.IMS_PER_BATCH,
        seed=comm.shared_random_seed(),  # Detectron2's TrainingSampler default
        landscape=landscape,
    )
    loader = torchdata.DataLoader(
        _SeededMapDataset(dataset_dicts, mapper),
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
