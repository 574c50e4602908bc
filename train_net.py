#!/usr/bin/env python
"""Train and evaluate DAB-DETR with Detectron2's trainer.

    python train_net.py --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --resume
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from dab_detr import _compat
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import BUILTIN_DATASETS, ensure_builtin_dataset, register_builtin_datasets
from dab_detr.dataset_mapper import DabDetrDatasetMapper
from dab_detr.solver import build_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with DETR's data augmentation, optimizer and COCO evaluation."""

    @classmethod
    def build_train_loader(cls, cfg):
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(cfg, mapper=DabDetrDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from detectron2.data import build_detection_test_loader

        return build_detection_test_loader(
            cfg, dataset_name, mapper=DabDetrDatasetMapper(cfg, False)
        )

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


def setup(args):
    cfg = get_dab_detr_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    register_builtin_datasets()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
