#!/usr/bin/env python
"""Train and evaluate DAB-DETR with Detectron2's trainer.

    python train_net.py --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --resume

Any COCO-format dataset trains and evaluates without code: name its json and image folder in
``DATASETS.REGISTER_COCO`` (see ``dab_detr/data/coco.py``).

``--num-gpus N`` runs N processes: one per GPU with CUDA, N CPU workers over gloo without it
(``dab_detr/engine/launch.py``). On M machines, run on each
``--num-machines M --machine-rank R --num-gpus N --dist-url tcp://<machine 0>:<port>``; on a
Slurm cluster, ``tools/run_with_submitit.py`` (docs/gpu.md). For a dataset of your own,
``SOLVER.EPOCHS`` gives the schedule in passes over it (``dab_detr/engine/schedule.py``).

``SOLVER.AMP.ENABLED True`` trains under autocast on CUDA, in ``SOLVER.AMP.PRECISION``
(float16 with loss scaling, or bfloat16; ``dab_detr/engine/amp.py``).

``--resume`` continues a run exactly: the optimizer, the scheduler and the data order and
augmentations (``dab_detr/engine/``) carry on from the last checkpoint, so a run killed and
resumed trains like one never stopped.

A mistake in the inputs (a misspelled config key, a config file, dataset or weights file that
does not exist) stops with one line saying what to do; ``--debug`` (or ``DAB_DETR_DEBUG=1``)
shows the traceback instead.
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import logging
import os

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dab_detr.checkpoint import DabDetrCheckpointer, architecture_record
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import (
    check_datasets,
    check_num_classes,
    register_builtin_datasets,
    register_coco_datasets,
)
from dab_detr.engine import Trainer, apply_epoch_schedule, launch
from dab_detr.engine.amp import autocast_dtype
from dab_detr.utils.user_errors import (
    InputFileNotFoundError,
    InputValueError,
    report_user_errors,
)

logger = logging.getLogger("dab_detr")


def load_config(args):
    """The run's config, with its datasets registered and checked: what can be wrong in the
    inputs is found here, before a model or a worker process is started."""
    cfg = get_dab_detr_cfg(args.config_file, args.opts)
    register_builtin_datasets()
    register_coco_datasets(cfg.DATASETS.REGISTER_COCO)
    if not args.eval_only:
        check_datasets("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
    check_datasets("DATASETS.TEST", cfg.DATASETS.TEST)
    # fail before building anything when the classes are already known (built-in datasets)
    check_num_classes(cfg.MODEL.DAB_DETR.NUM_CLASSES, cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    weights = cfg.MODEL.WEIGHTS
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not os.path.exists(weights) and not resumable:
        raise InputFileNotFoundError(f"MODEL.WEIGHTS: weights file {weights} does not exist")
    if cfg.SOLVER.AMP.ENABLED:
        if not cfg.MODEL.DEVICE.startswith("cuda"):
            raise InputValueError(
                f"SOLVER.AMP.ENABLED needs a CUDA device (Detectron2's AMPTrainer), but "
                f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}"
            )
        try:
            autocast_dtype(cfg)  # SOLVER.AMP.PRECISION, and bfloat16 on this GPU
        except ValueError as e:
            raise InputValueError(str(e)) from e
    return cfg


def setup(args):
    cfg = load_config(args)
    # before default_setup, which writes the config to OUTPUT_DIR/config.yaml
    schedule = None if args.eval_only else apply_epoch_schedule(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # our modules log under dab_detr.*: to the console and OUTPUT_DIR/log.txt like Detectron2's
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dab_detr")
    if schedule:
        logger.info(schedule)
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


def argument_parser():
    """Detectron2's ``default_argument_parser`` and ``--debug``."""
    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the inputs (or DAB_DETR_DEBUG=1)")
    return parser


def cli(argv=None):
    """``python train_net.py [argv]``: parse the arguments, check the inputs, start the
    workers."""
    args = argument_parser().parse_args(argv)
    with report_user_errors("train_net.py", debug=args.debug):
        load_config(args)  # in this process: a bad input stops here, not in every worker
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
