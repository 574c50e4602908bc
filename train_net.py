#!/usr/bin/env python
"""Train and evaluate DAB-DETR with Detectron2's trainer.

    python train_net.py --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --resume

Any COCO-format dataset trains and evaluates without code: name its json and image folder in
``DATASETS.REGISTER_COCO`` (see ``dab_detr/data/coco.py``).

``--num-gpus N`` runs N processes: one per GPU with CUDA, N CPU workers over gloo without it
(``dab_detr/engine/launch.py``). For a dataset of your own, ``SOLVER.EPOCHS`` gives the
schedule in passes over it (``dab_detr/engine/schedule.py``).

``--resume`` continues a run exactly: the optimizer, the scheduler and the data order and
augmentations (``dab_detr/engine/``) carry on from the last checkpoint, so a run killed and
resumed trains like one never stopped.
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import logging

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dab_detr.checkpoint import DabDetrCheckpointer, architecture_record
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import check_num_classes, register_builtin_datasets, register_coco_datasets
from dab_detr.engine import Trainer, apply_epoch_schedule, launch

logger = logging.getLogger("dab_detr")


def setup(args):
    cfg = get_dab_detr_cfg(args.config_file, args.opts)
    register_builtin_datasets()
    register_coco_datasets(cfg.DATASETS.REGISTER_COCO)
    # fail before building anything when the classes are already known (built-in datasets)
    check_num_classes(cfg.MODEL.DAB_DETR.NUM_CLASSES, cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    # before default_setup, which writes the config to OUTPUT_DIR/config.yaml
    schedule = None if args.eval_only else apply_epoch_schedule(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # our modules log under dab_detr.*: to the console and OUTPUT_DIR/log.txt like Detectron2's
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dab_detr")
    if schedule:
        logger.info(schedule)
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
    results = trainer.train()
    if comm.is_main_process():
        logger.info(where_the_results_are(cfg))
    return results


def where_the_results_are(cfg) -> str:
    """The closing lines of a training run: where its AP table, curve and pictures are."""
    out = cfg.OUTPUT_DIR
    lines = [
        f"Results of this run, in {out}:",
        f"  AP tables: the last 'Evaluation results' above, also in {out}/log.txt, and every "
        f"evaluation's bbox/AP* in {out}/metrics.json",
        f"  training curve: python tools/plot_metrics.py {out}/metrics.json "
        f"--output {out}/curve.png",
        f"  checkpoint: {out}/model_final.pth",
    ]
    if cfg.TEST.VIS_NUM_IMAGES > 0:
        lines += [f"  detections picture: {out}/inference/{name}_detections.png"
                  for name in cfg.DATASETS.TEST]
    return "\n".join(lines)


def cli(argv=None):
    """``python train_net.py [argv]``: parse the arguments, start the workers."""
    args = default_argument_parser().parse_args(argv)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
