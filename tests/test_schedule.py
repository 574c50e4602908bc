"""``SOLVER.EPOCHS`` (a schedule in passes over the training set) and
``SOLVER.CHECKPOINTS_TO_KEEP`` (periodic checkpoints kept), through train_net as a user runs
it on a dataset of their own."""

import os
import re

import pytest

import train_net
from conftest import SHAPES_CONFIG, SMALL, write_coco_dataset
from dab_detr.engine import epoch_schedule

# isort: split
from detectron2.engine import default_argument_parser


@pytest.fixture(scope="module")
def hundred_images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hundred"))
    json_file = write_coco_dataset(root, "train", 100, 0)
    return ["DATASETS.REGISTER_COCO", f"(('hundred', '{json_file}', '{root}/train'),)",
            "DATASETS.TRAIN", "('hundred',)", "DATASETS.TEST", "()"]


def _setup(output_dir, *opts, resume=False):
    argv = ["--config-file", SHAPES_CONFIG] + (["--resume"] if resume else [])
    argv += [*SMALL, "OUTPUT_DIR", str(output_dir), *opts]
    return train_net.setup(default_argument_parser().parse_args(argv))


def _train(cfg, resume=False):
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def _checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if re.fullmatch(r"model_\w+\.pth", f))


def test_epoch_schedule_arithmetic():
    assert epoch_schedule(12, 100, 4, 0.8) == (300, (240,))
    assert epoch_schedule(50, 118287, 16, 0.8) == (369650, (295720,))  # the COCO configs'
    assert epoch_schedule(2, 10, 4, 0.8) == (6, (5,))  # 3 batches an epoch, the last topped up
    assert epoch_schedule(3, 10, 4, 1.0) == (9, ())
    with pytest.raises(ValueError, match="SOLVER.LR_DROP_FRACTION"):
        epoch_schedule(3, 10, 4, 0.0)
    with pytest.raises(ValueError, match="SOLVER.EPOCHS"):
        epoch_schedule(-1, 10, 4, 0.8)


def test_epochs_12_on_100_images_train_300_iterations_with_the_drop_at_240(
        tmp_path, hundred_images, caplog):
    cfg = _setup(tmp_path, *hundred_images, "SOLVER.EPOCHS", "12", "SOLVER.IMS_PER_BATCH", "4",
                 "SOLVER.CHECKPOINT_PERIOD", "50", "SOLVER.CHECKPOINTS_TO_KEEP", "2",
                 "SOLVER.BASE_LR", "1e-4")
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (300, (240,))
    assert "SOLVER.EPOCHS 12: 100 training images at 4 a batch (25 iterations an epoch) give " \
           "SOLVER.MAX_ITER 300 and SOLVER.STEPS (240,)" in caplog.text
    trainer = _train(cfg)
    lr = {it: v for v, it in trainer.storage.history("lr").values()}
    assert sorted(lr) == list(range(300))
    assert lr[239] == pytest.approx(1e-4) and lr[240] == pytest.approx(1e-5)
    assert _checkpoints(tmp_path) == ["model_0000249.pth", "model_0000299.pth",
                                      "model_final.pth"]
    # the config written for the run holds the schedule it ran
    assert "MAX_ITER: 300" in (tmp_path / "config.yaml").read_text()


def test_resumed_run_keeps_the_newest_checkpoints_of_both_parts(tmp_path, hundred_images):
    opts = [*hundred_images, "SOLVER.CHECKPOINT_PERIOD", "5", "SOLVER.CHECKPOINTS_TO_KEEP", "2"]
    _train(_setup(tmp_path, *opts, "SOLVER.MAX_ITER", "20"))
    assert _checkpoints(tmp_path) == ["model_0000014.pth", "model_0000019.pth",
                                      "model_final.pth"]
    _train(_setup(tmp_path, *opts, "SOLVER.MAX_ITER", "27", resume=True), resume=True)
    assert _checkpoints(tmp_path) == ["model_0000019.pth", "model_0000024.pth",
                                      "model_final.pth"]


def test_retention_zero_keeps_every_checkpoint(tmp_path, hundred_images):
    _train(_setup(tmp_path, *hundred_images, "SOLVER.MAX_ITER", "12",
                  "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.CHECKPOINTS_TO_KEEP", "0"))
    assert _checkpoints(tmp_path) == [f"model_{i:07d}.pth" for i in (2, 5, 8, 11)] + [
        "model_final.pth"]


def test_eval_only_ignores_epochs(tmp_path, hundred_images):
    argv = ["--config-file", SHAPES_CONFIG, "--eval-only", *SMALL, "OUTPUT_DIR", str(tmp_path),
            *hundred_images, "SOLVER.EPOCHS", "12", "SOLVER.MAX_ITER", "7"]
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    assert cfg.SOLVER.MAX_ITER == 7


def test_negative_retention_is_refused(tmp_path, hundred_images):
    cfg = _setup(tmp_path, *hundred_images, "SOLVER.CHECKPOINTS_TO_KEEP", "-1")
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINTS_TO_KEEP must be an integer >= 0"):
        train_net.Trainer(cfg)
