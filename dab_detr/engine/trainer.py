"""train_net's ``Trainer``: Detectron2's ``DefaultTrainer`` with what DAB-DETR adds.

- DETR's data augmentation (:class:`~dab_detr.data.DabDetrDatasetMapper`) and a training
  loader that ``--resume`` continues exactly (:mod:`dab_detr.engine.train_loader`);
- AdamW with the backbone's learning rate and full-model gradient clipping
  (:mod:`dab_detr.engine.optimizer`);
- ``COCOEvaluator`` and, with ``TEST.VIS_NUM_IMAGES``, a picture of the detections;
- the checkpointer that loads safely and saves atomically
  (:class:`~dab_detr.checkpoint.DabDetrCheckpointer`), which also keeps the optimizer's state
  with Detectron2 v0.6;
- the NaN stop: a non-finite loss stops training with the last checkpoint named;
- with ``MODEL_EMA``, a moving average of the weights that evaluations score and checkpoints
  save as the model (:mod:`dab_detr.engine.ema`);
- multi-worker runs on CPU (gloo, :mod:`dab_detr.engine.launch`), a check that every worker
  holds the same model, and periodic checkpoints that keep the newest
  ``SOLVER.CHECKPOINTS_TO_KEEP``;
- with ``SOLVER.AMP.ENABLED``, autocast in ``SOLVER.AMP.PRECISION`` (float16 with loss scaling,
  or bfloat16; :mod:`dab_detr.engine.amp`).
"""

import os
import weakref

from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .. import _compat
from ..checkpoint import DabDetrCheckpointer, architecture_record
from ..data import (
    BUILTIN_DATASETS,
    DabDetrDatasetMapper,
    check_num_classes,
    ensure_builtin_dataset,
)
from .amp import autocast_trainer
from .ema import EMAHook, build_model_ema, unwrap
from .hooks import ReplicaCheckHook, RetainingPeriodicCheckpointer, TrainDataHook
from .launch import ddp_without_device_ids
from .optimizer import build_optimizer
from .predictor import draw_detections
from .train_loader import build_train_loader, restart_data_loader

__all__ = ["Trainer"]

_D2_CHECKPOINTS_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


class Trainer(DefaultTrainer):
    """DefaultTrainer with DETR's data augmentation, optimizer, COCO evaluation, a
    checkpointer that loads safely and saves atomically, and a resumable data loader."""

    def __init__(self, cfg):
        # DefaultTrainer wraps the model in DDP and builds its AMPTrainer for AMP configs
        with ddp_without_device_ids(), autocast_trainer(cfg):
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ builds its checkpointer just before its hooks; swap it here so
        # that loading, resuming and the periodic checkpoints all go through ours.
        self.model_ema = build_model_ema(self.cfg, self._trainer.model)
        self.checkpointer = DabDetrCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            arch=architecture_record(self.cfg),
            ema=self.model_ema,
            trainer=weakref.proxy(self),
        )
        ret = super().build_hooks()
        keep = self.cfg.SOLVER.CHECKPOINTS_TO_KEEP
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"SOLVER.CHECKPOINTS_TO_KEEP must be an integer >= 0 (0: keep "
                             f"all), got {keep!r}")
        for i, hook in enumerate(ret):
            if isinstance(hook, hooks.PeriodicCheckpointer):
                ret[i] = RetainingPeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                    max_to_keep=keep if keep > 0 else None,
                )
            elif isinstance(hook, hooks.EvalHook) and self.model_ema is not None:
                ret[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_model_ema)
        first = [ReplicaCheckHook(), TrainDataHook(self._trainer.data_loader)]
        if self.model_ema is not None:  # before the checkpointer and the evaluation
            first.append(EMAHook(self.model_ema))
        return first + ret

    def _test_model_ema(self):
        # DefaultTrainer's evaluation function, scoring the averaged weights
        self._last_eval_results = self.test(self.cfg, self.model_ema.module)
        return self._last_eval_results

    @classmethod
    def build_train_loader(cls, cfg):
        # checks each dataset's classes and annotations against the model as it loads it
        return build_train_loader(cfg, DabDetrDatasetMapper(cfg, True))

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.model_ema is not None and int(self.model_ema.n_averaged) == 0:
            # no average in the file: start it from the weights just loaded, not from the
            # initialisation it was copied from (what a finished run's last evaluation scores)
            self.model_ema.module.load_state_dict(unwrap(self._trainer.model).state_dict())
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
