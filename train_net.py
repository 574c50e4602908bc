#!/usr/bin/env python
"""Train and evaluate DAB-DETR with Detectron2's trainer.

    python train_net.py --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --resume

Any COCO-format dataset trains and evaluates without code: name its json and image folder in
``DATASETS.REGISTER_COCO`` (see ``dab_detr/data/coco.py``).

``--resume`` continues a run exactly: the optimizer, the scheduler and the data order and
augmentations (``dab_detr/engine.py``) carry on from the last checkpoint, so a run killed and
resumed trains like one never stopped.
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import logging
import os
import weakref

from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dab_detr import _compat
from dab_detr.checkpointer import DabDetrCheckpointer, architecture_record
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import (
    BUILTIN_DATASETS,
    check_num_classes,
    ensure_builtin_dataset,
    register_builtin_datasets,
    register_coco_datasets,
)
from dab_detr.dataset_mapper import DabDetrDatasetMapper
from dab_detr.engine import TrainDataHook, build_train_loader, restart_data_loader
from dab_detr.predictor import draw_detections
from dab_detr.solver import build_optimizer

logger = logging.getLogger("dab_detr")
_D2_CHECKPOINTS_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


class Trainer(DefaultTrainer):
    """DefaultTrainer with DETR's data augmentation, optimizer, COCO evaluation, a
    checkpointer that loads safely and saves atomically, and a resumable data loader."""

    def build_hooks(self):
        # DefaultTrainer.__init__ builds its checkpointer just before its hooks; swap it here so
        # that loading, resuming and the periodic checkpoints all go through ours.
        self.checkpointer = DabDetrCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            arch=architecture_record(self.cfg),
            trainer=weakref.proxy(self),
        )
        return [TrainDataHook(self._trainer.data_loader)] + super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg):
        # checks each dataset's classes and annotations against the model as it loads it
        return build_train_loader(cfg, DabDetrDatasetMapper(cfg, True))

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # the data order and augmentations continue from the checkpoint's iteration (and its
        # seed, restored with the TrainDataHook's state), not from the start of the stream
        self._trainer.data_loader.batch_sampler.start_iter = self.start_iter
        restart_data_loader(self._trainer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(
            cfg, dataset_name, mapper=DabDetrDatasetMapper(cfg, False)
        )
        check_num_classes(cfg.MODEL.DAB_DETR.NUM_CLASSES, [dataset_name])
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if dataset_name in BUILTIN_DATASETS:
            ensure_builtin_dataset(dataset_name)  # COCOEvaluator reads its json at once
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        # the fast evaluator is compiled code that a Python-only Detectron2 lacks
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             use_fast_impl=_compat.HAS_D2_EXTENSION)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if cfg.TEST.VIS_NUM_IMAGES > 0 and comm.is_main_process():
            for name in cfg.DATASETS.TEST:
                path = os.path.join(cfg.OUTPUT_DIR, "inference", f"{name}_detections.png")
                draw_detections(cfg, model, cls.build_test_loader(cfg, name), name, path)
        return results

    # Detectron2 v0.6 checkpoints only the iteration and the hooks' states, so --resume restarted
    # AdamW's moments from zero; later versions also keep the optimizer (and the AMP grad
    # scaler) under "_trainer". Keep them with either.
    def state_dict(self):
        ret = super().state_dict()
        if not _D2_CHECKPOINTS_OPTIMIZER:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not _D2_CHECKPOINTS_OPTIMIZER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            last = self.checkpointer.get_checkpoint_file() or "none saved yet"
            raise FloatingPointError(
                f"{e}\nTraining stopped; the last checkpoint is {last} (continue from it with "
                "--resume after fixing the cause, e.g. a lower SOLVER.BASE_LR)."
            ) from e


def setup(args):
    cfg = get_dab_detr_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # our modules log under dab_detr.*: to the console and OUTPUT_DIR/log.txt like Detectron2's
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dab_detr")
    register_builtin_datasets()
    register_coco_datasets(cfg.DATASETS.REGISTER_COCO)
    # fail before building anything when the classes are already known (built-in datasets)
    check_num_classes(cfg.MODEL.DAB_DETR.NUM_CLASSES, cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(
            f"SOLVER.AMP.ENABLED needs a CUDA device (Detectron2's AMPTrainer), but "
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}"
        )
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DabDetrCheckpointer(model, cfg.OUTPUT_DIR, arch=architecture_record(cfg)).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
