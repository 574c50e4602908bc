"""Killed runs resume exactly; configuration mistakes fail before training, naming the key.

The killed run is a real ``train_net.py`` process on a small COCO-format dataset, SIGKILLed
after its first checkpoint; the resumed and the uninterrupted runs are train_net's
``Trainer`` in this process, on the same seed.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_net
from conftest import REFERENCE, REPO, SMALL, config_path, small_cfg
from conftest import SHAPES_CONFIG as CONFIG
from dab_detr.checkpoint import ARCH_KEY, DabDetrCheckpointer, architecture_record
from dab_detr.convert import main as convert_main
from dab_detr.data import generate_shapes_dataset
from dab_detr.data.dataset_mapper import DabDetrDatasetMapper
from dab_detr.engine import build_train_loader, restart_data_loader

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.modeling import build_model

# A schedule with warm-up and a step, and DETR's random crop: resuming must restore the
# scheduler and replay the augmentation.
RUN = ["SOLVER.MAX_ITER", "9", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "3",
       "SOLVER.STEPS", "(6,)", "SOLVER.BASE_LR", "1e-3", "INPUT.CROP.ENABLED", "True",
       "INPUT.CROP.SIZE", "(64, 96)", "INPUT.MIN_SIZE_TRAIN", "(80, 96)", "DATASETS.TEST", "()"]


# The runs compared here must round alike: one intra-op thread in every process (the
# subprocesses get OMP_NUM_THREADS=1 / set_num_threads(1)).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """DATASETS opts of a 12-image COCO-format dataset on disk."""
    root = tmp_path_factory.mktemp("shapes")
    json_file = generate_shapes_dataset(str(root), "train", 12, seed=5)
    entry = (("killed_train", json_file, str(root / "train")),)
    yield ["DATASETS.REGISTER_COCO", repr(entry), "DATASETS.TRAIN", "('killed_train',)"]
    if "killed_train" in DatasetCatalog.list():
        DatasetCatalog.remove("killed_train")
        MetadataCatalog.remove("killed_train")


def _argv(output_dir, *opts):
    return ["--config-file", CONFIG, *SMALL, *RUN, "OUTPUT_DIR", str(output_dir), *opts]


def _trainer(output_dir, *opts, resume=False):
    args = default_argument_parser().parse_args((["--resume"] if resume else []) +
                                                 _argv(output_dir, *opts))
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=resume)
    return trainer


def _history(trainer):
    """``{metric: {iteration: value}}`` of every loss and the learning rate."""
    return {name: {it: v for v, it in h.values()}
            for name, h in trainer.storage.histories().items()
            if name.startswith("loss") or name in ("total_loss", "lr")}


def _run_until_first_checkpoint_then_kill(output_dir, opts):
    """Start train_net.py, SIGKILL it (and its data-loader worker) once a checkpoint is
    tagged; return the tagged checkpoint's path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output_dir.mkdir()
    with open(output_dir / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "train_net.py", *_argv(output_dir, *opts)],
                                cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        tag = output_dir / "last_checkpoint"
        deadline = time.monotonic() + 300
        while not tag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group: train_net.py, its worker
        proc.wait()
        stderr.seek(0)
        assert proc.returncode == -signal.SIGKILL, stderr.read()[-3000:]
    return output_dir / tag.read_text()


@pytest.mark.parametrize("ema", [[], ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]],
                         ids=["plain", "model_ema"])
def test_killed_run_resumes_like_an_uninterrupted_one(tmp_path, shapes, ema):
    shapes = [*shapes, *ema]
    killed_dir = tmp_path / "killed"
    # the killed run loads data in a worker process; the others in the main process: the
    # data order and augmentations must not depend on it
    checkpoint = _run_until_first_checkpoint_then_kill(
        killed_dir, [*shapes, "DATALOADER.NUM_WORKERS", "1"])
    saved = torch.load(checkpoint, weights_only=True)
    last = saved["iteration"]
    assert last in (2, 5) and not (killed_dir / "model_final.pth").exists()

    reference = _trainer(tmp_path / "reference", *shapes)
    reference.train()
    resumed = _trainer(killed_dir, *shapes, resume=True)
    assert resumed.start_iter == last + 1
    # optimizer, scheduler and data sampler continue from the checkpoint
    steps = {float(s["step"]) for s in resumed._trainer.optimizer.state_dict()["state"].values()}
    assert steps == {last + 1.0}
    assert resumed.scheduler.last_epoch == last + 1
    sampler = resumed._trainer.data_loader.batch_sampler
    assert sampler.start_iter == last + 1
    assert sampler.seed == saved["trainer"]["hooks"]["TrainDataHook"]["seed"]
    assert sampler.seed == reference._trainer.data_loader.batch_sampler.seed
    resumed.train()

    expected, actual = _history(reference), _history(resumed)
    assert set(actual) == set(expected) and "loss_giou" in actual
    after = list(range(last + 1, 9))
    for name, values in expected.items():
        assert sorted(actual[name]) == after, name
        torch.testing.assert_close(torch.tensor([actual[name][i] for i in after]),
                                   torch.tensor([values[i] for i in after]),
                                   rtol=1e-6, atol=1e-7, msg=name)
    for k, v in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    if ema:  # and so does the average of the weights
        assert resumed.model_ema is not None
        for k, v in reference.model_ema.module.state_dict().items():
            torch.testing.assert_close(resumed.model_ema.module.state_dict()[k], v, rtol=1e-5,
                                       atol=1e-6, msg=k)


def _batches(loader, n):
    out = []
    for batch, _ in zip(loader, range(n)):
        out.append([(d["file_name"], d["image"], d["instances"].gt_boxes.tensor) for d in batch])
    return out


def test_loader_resumes_mid_stream_with_any_worker_count(tmp_path, shapes):
    cfg = train_net.setup(default_argument_parser().parse_args(_argv(tmp_path, *shapes)))
    mapper = DabDetrDatasetMapper(cfg, True)
    loader = build_train_loader(cfg, mapper)
    uninterrupted = _batches(loader, 6)

    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 1
    resumed = build_train_loader(cfg, mapper)
    # what resuming does: the seed comes from the checkpoint, the start from its iteration
    resumed.batch_sampler.seed = loader.batch_sampler.seed
    resumed.batch_sampler.start_iter = 4
    for got, want in zip(_batches(resumed, 2), uninterrupted[4:], strict=True):
        for (name, image, boxes), (name0, image0, boxes0) in zip(got, want, strict=True):
            assert name == name0
            torch.testing.assert_close(image, image0, rtol=0, atol=0)
            torch.testing.assert_close(boxes, boxes0, rtol=0, atol=0)
    # the crop and resizes are random: the stream is not the same batch over and over
    assert len({tuple(b[0][1].shape) for b in uninterrupted}) > 1
    # images of one orientation per batch (Detectron2's aspect-ratio grouping)
    records = {d["file_name"]: d for d in DatasetCatalog.get("killed_train")}
    for batch in uninterrupted:
        assert len({records[name]["width"] > records[name]["height"] for name, _, _ in batch}) == 1


class _LazyIteratorTrainer:
    """What SimpleTrainer became after Detectron2 0.6 (its main branch, read on GitHub): the
    iterator is made on first use, and ``reset_data_loader`` replaces the loader."""

    def __init__(self, data_loader):
        self.data_loader = data_loader
        self._data_loader_iter_obj = None

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def reset_data_loader(self, data_loader_builder):
        del self.data_loader
        self.data_loader = data_loader_builder()
        self._data_loader_iter_obj = None


class _Counter:
    """An iterable counting from ``start``, read when iteration begins (like the sampler)."""

    start = 0

    def __iter__(self):
        return iter(range(self.start, 100))


@pytest.mark.parametrize("trainer_class", [SimpleTrainer, _LazyIteratorTrainer])
def test_restart_data_loader_with_either_detectron2(trainer_class):
    loader = _Counter()
    trainer = (trainer_class(torch.nn.Linear(1, 1), loader, None)
               if trainer_class is SimpleTrainer else trainer_class(loader))
    assert next(trainer._data_loader_iter) == 0
    loader.start = 7
    restart_data_loader(trainer)
    assert next(trainer._data_loader_iter) == 7


def test_config_mistakes_name_the_key(tmp_path):
    def setup(*opts, config=CONFIG):
        argv = ["--config-file", str(config), "OUTPUT_DIR", str(tmp_path), *opts]
        return train_net.setup(default_argument_parser().parse_args(argv))

    with pytest.raises((KeyError, AssertionError), match="MODEL.DAB_DETR.NUM_QUERYS"):
        setup("MODEL.DAB_DETR.NUM_QUERYS", "10")
    with pytest.raises(ValueError, match=r"\(30 vs. many\) for config key: "
                                         "MODEL.DAB_DETR.NUM_QUERIES"):
        setup("MODEL.DAB_DETR.NUM_QUERIES", "many")
    with pytest.raises(ValueError, match="for config key: SOLVER.STEPS"):
        setup("SOLVER.STEPS", "700")
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"_BASE_: {CONFIG}\nSOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(KeyError, match=r"typo.yaml: SOLVER.BASE_LRR is not a config key; did "
                                       r"you mean SOLVER.BASE_LR\?"):
        setup(config=typo)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"_BASE_: {CONFIG}\nMODEL:\n  DAB_DETR:\n    ENC_LAYERS: [3]\n")
    with pytest.raises(ValueError, match="for config key: MODEL.DAB_DETR.ENC_LAYERS"):
        setup(config=wrong)


def _small_model(*opts):
    cfg = small_cfg(*opts)
    return build_model(cfg), architecture_record(cfg)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    model, arch = _small_model()
    DabDetrCheckpointer(model, str(tmp_path), arch=arch).save("mine")
    path = tmp_path / "mine.pth"
    assert torch.load(path, weights_only=True)[ARCH_KEY] == arch
    other, other_arch = _small_model("MODEL.DAB_DETR.PE_TEMPERATURE_H", "10",
                                     "MODEL.DAB_DETR.NHEADS", "2")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as info:
        DabDetrCheckpointer(other, arch=other_arch).load(str(path))
    assert (f"{path} was saved from a model of another architecture "
            "(MODEL.DAB_DETR.NHEADS is 4 in the file, 2 in the config; "
            "MODEL.DAB_DETR.PE_TEMPERATURE_H is 20 in the file, 10 in the config)"
            ) in str(info.value)
    for k, v in other.state_dict().items():  # refused before anything was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the same weights without a record (older checkpoints, other tools) load as before
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")
    DabDetrCheckpointer(other, arch=other_arch).load(str(tmp_path / "plain.pth"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)




def test_dc5_config_refuses_converted_non_dc5_checkpoint(tmp_path):
    """python -m dab_detr.convert records the architecture; train_net refuses a DC5 config
    for the converted R50 (non-DC5) weights before evaluating anything."""
    with open(REFERENCE) as f:
        shapes = json.load(f)["R50"]
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in [k for k in official if k.startswith("bbox_embed.")]:
        official["transformer.decoder." + k] = official[k].clone()
    torch.save({"model": official}, tmp_path / "official.pth")
    converted = tmp_path / "dab_detr_R_50.pth"
    r50 = config_path("COCO-Detection/dab_detr_R_50_50ep.yaml")
    convert_main(["--source", "official", "--config-file", r50, str(tmp_path / "official.pth"),
                  str(converted)])
    record = torch.load(converted, weights_only=True, mmap=True)[ARCH_KEY]
    assert record["MODEL.RESNETS.RES5_DILATION"] == 1
    assert record["MODEL.DAB_DETR.PE_TEMPERATURE_H"] == 20

    dc5 = config_path("COCO-Detection/dab_detr_R_50_DC5_50ep.yaml")
    # no test set: COCO is not here, and the weights are refused before one would be read
    argv = ["--config-file", dc5, "--eval-only", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS",
            str(converted), "OUTPUT_DIR", str(tmp_path / "eval"), "DATASETS.TEST", "()"]
    with pytest.raises(ValueError) as info:
        train_net.main(default_argument_parser().parse_args(argv))
    message = str(info.value)
    assert message.startswith(f"{converted} was saved from a model of another architecture")
    assert "MODEL.RESNETS.RES5_DILATION is 1 in the file, 2 in the config" in message
    assert "MODEL.DAB_DETR.PE_TEMPERATURE_H is 20 in the file, 10 in the config" in message
    assert not (tmp_path / "eval" / "inference").exists()


def test_resume_restores_the_sampler_seed_not_the_configs(tmp_path, shapes):
    """SEED -1 draws a new seed per start: the data order still continues the killed run's."""
    first = _trainer(tmp_path, *shapes, "SEED", "-1", "SOLVER.MAX_ITER", "3")
    first.train()
    seed = first._trainer.data_loader.batch_sampler.seed
    resumed = _trainer(tmp_path, *shapes, "SEED", "-1", "SOLVER.MAX_ITER", "3", resume=True)
    assert resumed._trainer.data_loader.batch_sampler.seed == seed
