"""Detectron2's checkpointer, made safe to load from and to crash in.

:class:`DabDetrCheckpointer` is a ``DetectionCheckpointer`` that

- reads weight files without running code from them: ``.pth`` through torch's weights-only
  loader, Detectron2's ``.pkl`` model-zoo files through an unpickler restricted to numpy arrays
  and plain containers (:mod:`dab_detr.checkpoint`);
- drops the class head, with a warning, when the checkpoint has another class count
  (fine-tuning a COCO model on a dataset of its own), and refuses any other shape mismatch
  with an error naming the parameters, instead of silently training them from scratch;
- saves atomically: a checkpoint is written to a temporary file and renamed, and so is the
  ``last_checkpoint`` tag, so a run killed while saving keeps the previous checkpoint and tag.
"""

import os
import tempfile
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .checkpoint import load_restricted_pickle, load_state_dict_file

__all__ = ["DabDetrCheckpointer", "CLASS_HEAD_PREFIX"]

CLASS_HEAD_PREFIX = "class_embed."


class DabDetrCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe loading, class-head replacement and atomic saves."""

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_restricted_pickle(filename)
            if not isinstance(data, dict):
                raise ValueError(f"{filename}: expected a dict, got {type(data).__name__}")
            if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            data = data.get("blobs", data)  # Caffe2 / Detectron1 model zoo
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = load_state_dict_file(filename)
        return loaded if "model" in loaded else {"model": loaded}

    def _load_model(self, checkpoint: Dict[str, Any]):
        if not checkpoint.get("matching_heuristics", False):
            self._check_shapes(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _check_shapes(self, weights: Dict[str, Any]) -> None:
        """Drop a class head of another class count; raise on any other shape mismatch."""
        model = self.model.module if hasattr(self.model, "module") else self.model
        expected = model.state_dict()
        wrong = {
            k: (tuple(v.shape), tuple(expected[k].shape))
            for k, v in weights.items()
            if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)
        }
        source = getattr(self, "_loading", "the checkpoint")
        head = {k: s for k, s in wrong.items() if k.startswith(CLASS_HEAD_PREFIX)}
        other = {k: s for k, s in wrong.items() if k not in head}
        if other:
            listed = "; ".join(
                f"{k}: {a} in the file, {b} in the model" for k, (a, b) in other.items()
            )
            raise ValueError(
                f"{source} does not fit the model built from the config ({listed}). Only the "
                "class head may differ (it is then re-initialised); check MODEL.DAB_DETR "
                "(NUM_QUERIES, NUM_PATTERNS, HIDDEN_DIM, ...) and MODEL.RESNETS against the "
                "checkpoint."
            )
        if head:
            (checkpoint_classes, _), (model_classes, _) = next(iter(head.values()))
            self.logger.warning(
                f"{source} has a class head for {checkpoint_classes} classes, the model "
                f"{model_classes} (MODEL.DAB_DETR.NUM_CLASSES): not loading "
                f"{', '.join(sorted(head))}; the class head is trained from its initialisation."
            )
            for k in head:
                del weights[k]

    def save(self, name: str, **kwargs: Any) -> None:
        """Same as ``DetectionCheckpointer.save``, but never leaves a half-written file."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))


def _atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
