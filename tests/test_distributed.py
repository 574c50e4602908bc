"""Two CPU processes (gloo) train and evaluate like one process with the whole batch.

Each worker runs the real model: forward, set criterion (whose box count is averaged over the
workers) and DDP backward on half the batch; takes its share of the training loader's
batches; and evaluates its shard of the validation set with train_net's ``COCOEvaluator``,
which gathers every image's predictions once on the main worker. One spawn serves all tests.
"""

import collections
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train_net
from conftest import SHAPES_CONFIG as CONFIG
from conftest import SMALL
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import ensure_builtin_dataset, register_builtin_datasets
from dab_detr.data.dataset_mapper import DabDetrDatasetMapper
from dab_detr.engine import build_train_loader
from dab_detr.engine.hooks import replica_mismatches

# isort: split
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

WORLD = 2
COUNTS = {"dab_shapes_train": 8, "dab_shapes_val": 6}
# Frozen batch norm: with per-worker batch statistics two workers cannot match one anyway.
OPTS = [*SMALL, "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "FrozenBN", "SOLVER.IMS_PER_BATCH",
        "4", "DATASETS.TEST", "('dab_shapes_val',)"]
LOADER_SEED = 1234


# The runs compared here must round alike: one intra-op thread in every process (the
# subprocesses get OMP_NUM_THREADS=1 / set_num_threads(1)).
pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    """Four 96x128 images; the first worker's half holds 5 boxes, the second's 1 (and an
    empty image), so dividing by a per-worker box count would not match one process."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for n in (3, 2, 0, 1):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        wh = 10 + torch.rand(n, 2, generator=g) * 30
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 5, (n,), generator=g)
        image = torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": 96, "width": 128})
    return batch


def _cfg(output_dir):
    cfg = get_dab_detr_cfg(CONFIG, [*OPTS, "OUTPUT_DIR", str(output_dir)])
    cfg.freeze()
    return cfg


def _train_step(model, batch):
    """Losses (floats) and parameter gradients of one forward/backward."""
    losses = model(batch)
    sum(losses.values()).backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads


def _loader_batches(cfg, n):
    loader = build_train_loader(cfg, DabDetrDatasetMapper(cfg, True))
    loader.batch_sampler.seed = LOADER_SEED
    return [[(d["file_name"], d["image"]) for d in b] for b, _ in zip(loader, range(n))]


def _worker(rank, init_file, datasets_root, weights, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        # what Detectron2's launch() sets up besides the global group
        if hasattr(comm, "create_local_process_group"):
            comm.create_local_process_group(WORLD)
        else:  # Detectron2 0.6
            comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(WORLD)))
        register_builtin_datasets(datasets_root, COUNTS)
        cfg = _cfg(f"{out_dir}/eval")
        model = build_model(cfg)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.train()
        batch = _batch()
        half = len(batch) // WORLD
        losses, grads = _train_step(DistributedDataParallel(model),
                                    batch[rank * half : (rank + 1) * half])
        batches = _loader_batches(cfg, 2)
        model.eval()
        results = train_net.Trainer.test(cfg, model)
        torch.save({"losses": losses, "grads": grads, "batches": batches, "results": results},
                   f"{out_dir}/rank{rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(workers, single)``: what each of the two workers saved, and the same computed by
    one process."""
    tmp = tmp_path_factory.mktemp("distributed")
    register_builtin_datasets(tmp / "datasets", COUNTS)
    for name in COUNTS:  # generated once here, not raced for by the workers
        ensure_builtin_dataset(name)
    torch.manual_seed(0)
    cfg = _cfg(tmp / "single")
    model = build_model(cfg)
    torch.save(model.state_dict(), tmp / "weights.pth")
    # fork: the workers start with this process's imports (spawn would redo them, slowly)
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp / "datasets"),
                                      str(tmp / "weights.pth"), str(tmp)),
                       nprocs=WORLD, join=True, start_method="fork")
    workers = [torch.load(tmp / f"rank{r}.pth", weights_only=False) for r in range(WORLD)]
    model.train()
    losses, grads = _train_step(model, _batch())
    model.eval()
    single = {"losses": losses, "grads": grads, "batches": _loader_batches(cfg, 2),
              "results": train_net.Trainer.test(cfg, model), "dir": tmp}
    yield workers, single
    register_builtin_datasets()  # leave the default registration to the other tests


def test_two_workers_give_the_loss_and_gradients_of_one(runs):
    workers, single = runs
    assert set(workers[0]["losses"]) == set(single["losses"]) and "loss_giou_0" in single["losses"]
    for k, v in single["losses"].items():
        # Detectron2 reports the mean over workers of each worker's loss
        mean = sum(w["losses"][k] for w in workers) / WORLD
        assert mean == pytest.approx(v, rel=1e-5, abs=1e-6), k
    grads = single["grads"]
    assert set(workers[0]["grads"]) == set(grads) and len(grads) > 50
    for name, g in grads.items():
        # DDP leaves the same averaged gradient on both workers
        torch.testing.assert_close(workers[1]["grads"][name], workers[0]["grads"][name],
                                   rtol=0, atol=0, msg=name)
        torch.testing.assert_close(workers[0]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_each_worker_takes_its_half_of_every_training_batch(runs):
    workers, single = runs
    for i, batch in enumerate(single["batches"]):
        assert len(batch) == 4
        shares = [w["batches"][i] for w in workers]
        assert [len(s) for s in shares] == [2, 2]
        for (name, image), (name0, image0) in zip(shares[0] + shares[1], batch, strict=True):
            assert name == name0
            torch.testing.assert_close(image, image0, rtol=0, atol=0)


def test_evaluation_gathers_every_image_once(runs):
    workers, single = runs
    tmp = single["dir"]
    # the non-main worker returns no results; the main one those of the whole set
    assert workers[1]["results"] == {}
    assert workers[0]["results"]["bbox"] == pytest.approx(single["results"]["bbox"], rel=0,
                                                          abs=1e-12, nan_ok=True)
    gathered = torch.load(tmp / "eval" / "inference" / "instances_predictions.pth",
                          weights_only=True)
    ids = collections.Counter(p["image_id"] for p in gathered)
    val_ids = [d["image_id"] for d in DatasetCatalog.get("dab_shapes_val")]
    assert sorted(ids) == sorted(val_ids) and set(ids.values()) == {1}
    # the detections written for COCO: 10 queries x 5 classes per image, once
    results = json.loads((tmp / "eval" / "inference" / "coco_instances_results.json").read_text())
    assert collections.Counter(r["image_id"] for r in results) == {i: 50 for i in val_ids}
    single_file = tmp / "single" / "inference" / "coco_instances_results.json"
    key = lambda r: (r["image_id"], r["category_id"], r["score"])  # noqa: E731
    assert sorted(results, key=key) == sorted(json.loads(single_file.read_text()), key=key)


def _mismatch_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = torch.nn.Linear(3, 2)
        torch.nn.init.ones_(model.weight)
        torch.nn.init.zeros_(model.bias)
        model.register_buffer("same", torch.arange(4.0))
        model.register_buffer("drawn", torch.full((2,), float(rank)))  # per worker
        before = replica_mismatches(DistributedDataParallel(model, broadcast_buffers=False))
        with torch.no_grad():
            model.bias[0] += rank  # a parameter that drifted apart
        after = replica_mismatches(model)
        torch.save({"before": before, "after": after}, f"{out_dir}/mismatch{rank}.pth")
    finally:
        dist.destroy_process_group()


def test_replica_check_names_the_tensors_that_differ_between_workers(tmp_path):
    mp.start_processes(_mismatch_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=WORLD, join=True, start_method="fork")
    for rank in range(WORLD):
        found = torch.load(tmp_path / f"mismatch{rank}.pth", weights_only=True)
        # DDP broadcast the parameters, not the buffers (broadcast_buffers=False)
        assert found["before"] == {"parameters": [], "buffers": ["drawn"]}
        assert found["after"] == {"parameters": ["bias"], "buffers": ["drawn"]}
