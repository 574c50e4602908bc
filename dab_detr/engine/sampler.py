"""Training batches that are a function of the seed and the iteration only, so that a resumed
run (``--resume``) draws the same images as the run it continues.

Detectron2's loader restarts its ``TrainingSampler`` stream on ``--resume``. Here
:class:`ResumableBatchSampler` cuts the sampler's seeded index stream into global batches of
``SOLVER.IMS_PER_BATCH`` (grouped by aspect ratio like Detectron2's, from the dataset's
``width``/``height``), so batch ``i`` depends on the seed and ``i`` only and the sampler can
start at any iteration; rank ``r`` of ``W`` takes slots ``[r * B / W, (r + 1) * B / W)``.
Each sample comes with its :data:`SampleSeed`, from which ``seeding.py`` seeds its
augmentation.
"""

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import List, Optional, Tuple

import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm

__all__ = ["ResumableBatchSampler", "SampleSeed", "index_stream"]

logger = logging.getLogger(__name__)

# (seed, iteration, slot in the global batch): seeds the augmentation of one sample
SampleSeed = Tuple[int, int, int]


class ResumableBatchSampler(torchdata.Sampler):
    """Per-rank batches of ``(dataset index, sample seed)`` from global batches that are a
    function of ``seed`` and the iteration only. Set ``start_iter`` and ``seed`` before
    iterating (a resumed run does)."""

    def __init__(
        self,
        make_indices: Callable[[int], Iterator[int]],
        total_batch_size: int,
        seed: int,
        landscape: Optional[Sequence[bool]] = None,
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

    def global_batches(self, seed: int) -> Iterator[List[int]]:
        """The global batches of B dataset indices, from iteration 0."""
        buckets: Tuple[List[int], List[int]] = ([], [])
        for index in self.make_indices(seed):
            bucket = buckets[int(self.landscape is not None and bool(self.landscape[index]))]
            bucket.append(index)
            if len(bucket) == self.total_batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[List[Tuple[int, SampleSeed]]]:
        seed, start = self.seed, self.start_iter  # read once: the stream must not change
        lo = self.rank * self.batch_size
        batches = itertools.islice(self.global_batches(seed), start, None)
        for iteration, batch in enumerate(batches, start=start):
            mine = batch[lo : lo + self.batch_size]
            yield [(index, (seed, iteration, lo + j)) for j, index in enumerate(mine)]



def index_stream(cfg: CfgNode, dataset_dicts: List[dict]) -> Callable[[int], Iterator[int]]:
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


