"""Resident memory (RSS) of a DAB-DETR training run on CPU: does it grow with iterations?
Linux only: the RSS is read from ``/proc/self/status``.

    python benchmarks/memory_stability.py [--iters 300] [--every 25] [--warmup 50]
                                          [--num-images N] [KEY VALUE ...]

Trains train_net's ``Trainer`` with ``configs/quick_schedules/dab_detr_R_18_shapes.yaml`` (on
CPU, no evaluation, no checkpoints; ``KEY VALUE`` pairs override the config, e.g. a smaller
model) on the built-in ``dab_shapes_train`` (``--num-images``: a smaller copy of it in a
temporary folder). Prints the RSS of the training process every ``--every`` iterations, then
its growth from the end of ``--warmup`` (allocator pools and caches fill up first) to the end,
per 100 iterations. Beside it, the tensors alive in Python (count and storage size): flat
while RSS grows means the allocator's pools grow (glibc's arenas fragment under many tensor
shapes, oneDNN caches a kernel per shape), not that the training keeps tensors; with glibc,
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment returns large freed blocks to the system
and shows the difference. Data-loader workers are separate processes, not counted: run with
``DATALOADER.NUM_WORKERS 0`` to include the data pipeline.
"""

import argparse
import gc
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_net  # noqa: E402  (first: prepares Detectron2's import)

# isort: split
import torch  # noqa: E402

# isort: split
from detectron2.engine import HookBase, default_argument_parser  # noqa: E402

from benchmarks.measure import status_mib  # noqa: E402
from dab_detr.data import register_builtin_datasets  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "dab_detr_R_18_shapes.yaml")


def live_tensors() -> tuple[int, float]:
    """Tensors reachable by Python's garbage collector, and their distinct storages in MiB."""
    count, storages = 0, {}
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj):
                continue
            storage = obj.untyped_storage()
        except Exception:  # dead weak proxies, tensor subclasses without storage
            continue
        count += 1
        storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values()) / 2**20


class RssReport(HookBase):
    """Print the RSS and live tensors every ``every`` iterations and keep ``(iteration, MiB)``
    samples of the RSS."""

    def __init__(self, every: int):
        self.every = every
        self.samples: list[tuple[int, float]] = []
        self.start = time.perf_counter()

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.every == 0 or done == self.trainer.max_iter:
            self.samples.append((done, status_mib("VmRSS")))
            tensors, tensor_mib = live_tensors()
            print(f"iter {done:6d}  rss {self.samples[-1][1]:8.1f} MiB  tensors {tensors:6d} "
                  f"({tensor_mib:7.1f} MiB)  {time.perf_counter() - self.start:6.0f} s",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=50, help="iterations before the baseline")
    parser.add_argument("--num-images", type=int, default=0, help="0: the full dab_shapes_train")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    if args.warmup >= args.iters:
        parser.error("--warmup must be below --iters")

    with tempfile.TemporaryDirectory() as tmp:
        if args.num_images:
            counts = {"dab_shapes_train": args.num_images}
            train_net.register_builtin_datasets = lambda: register_builtin_datasets(tmp, counts)
        opts = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(args.iters), "DATASETS.TEST", "()",
                "SOLVER.CHECKPOINT_PERIOD", str(10 * args.iters), "OUTPUT_DIR", tmp, *args.opts]
        cfg = train_net.setup(default_argument_parser().parse_args(["--config-file", CONFIG,
                                                                     *opts]))
        trainer = train_net.Trainer(cfg)
        report = RssReport(args.every)
        trainer.register_hooks([report])
        print(f"start: rss {status_mib('VmRSS'):.1f} MiB, {args.iters} iterations, "
              f"batch {cfg.SOLVER.IMS_PER_BATCH}, {cfg.DATALOADER.NUM_WORKERS} data workers")
        trainer.train()

    base = next((s for s in report.samples if s[0] >= args.warmup), report.samples[0])
    end = report.samples[-1]
    growth = end[1] - base[1]
    print(f"RSS growth from iteration {base[0]} to {end[0]}: {growth:+.1f} MiB "
          f"({100 * growth / max(end[0] - base[0], 1):+.2f} MiB per 100 iterations); "
          f"peak {max(m for _, m in report.samples):.1f} MiB")


if __name__ == "__main__":
    main()
