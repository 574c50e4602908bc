"""Per-sample augmentation seeds: each training sample is mapped under ``np.random`` (and
``random``) seeded from its ``(seed, iteration, slot)``, so its augmentation does not depend on
the number of data-loader workers, on the world size, or on where the run started (Detectron2
seeds its workers anew at each start). An unreadable image (the mapper returns ``None``) is
replaced by another drawn from that same seeded stream, and the replaced files are reported
with the sample under :data:`SKIPPED_KEY`.
"""

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import DatasetFromList

from .sampler import SampleSeed

__all__ = ["SKIPPED_KEY", "SeededMapDataset", "python_random_state_kept"]

# Set by the dataset on a mapped sample that replaced unreadable images; TrainLoader removes it.
SKIPPED_KEY = "_dab_detr_skipped_files"
# Unreadable images drawn in a row before giving up: the image folder is probably wrong.
_MAX_CONSECUTIVE_SKIPS = 100


@contextlib.contextmanager
def python_random_state_kept() -> Iterator[None]:
    """Give ``np.random`` and ``random`` back the state they had on entering (torch's own
    generators: ``torch.random.fork_rng``)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def _seeded_random(seed: SampleSeed) -> Iterator[None]:
    """Seed ``np.random`` and ``random`` (Detectron2's augmentations draw from them) for one
    sample, and give the caller back its own random state afterwards."""
    with python_random_state_kept():
        np.random.seed(list(seed))
        random.seed(repr(seed))  # a str seed is hashed with SHA-512: the same in every process
        yield


class SeededMapDataset(torchdata.Dataset):
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
                        mapped[SKIPPED_KEY] = skipped
                    return mapped
                skipped.append(record["file_name"])
                index = int(np.random.randint(len(self.dicts)))  # seeded: reproducible
        raise RuntimeError(
            f"{len(skipped)} training images in a row could not be read (the last: "
            f"{skipped[-1]}); check the dataset's image folder"
        )

