"""Detectron2's checkpointer, made safe to load from and to crash in.

:class:`DabDetrCheckpointer` is a ``DetectionCheckpointer`` that

- reads weight files, local or at a URL (downloaded once into iopath's cache:
  ``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``), without running code from them: ``.pth``
  through torch's weights-only loader, Detectron2's ``.pkl`` model-zoo files through an
  unpickler restricted to numpy arrays and plain containers (:mod:`.safe_load`);
- takes released ``.pth`` weights as they are: the layout of their names (this project's,
  official, transformers, detrex, torchvision, DAT: :func:`.conversion.detect_layout`) is converted
  for the model by the converters of ``python -m dab_detr.convert``; an unknown one is an error;
- drops the class head (and DN-DETR's label embedding), with a warning, when the checkpoint
  has another class count (fine-tuning a COCO model on a dataset of its own), and refuses any
  other shape mismatch with an error naming the parameters, instead of silently training them
  from scratch;
- saves atomically: a checkpoint is written to a temporary file and renamed, and so is the
  ``last_checkpoint`` tag, so a run killed while saving keeps the previous checkpoint and tag;
- records the architecture settings that leave every tensor shape unchanged (DC5 or not, the
  position-encoding temperatures, ...: :mod:`dab_detr.checkpoint.arch_record`) in what it
  saves, and refuses a file whose record disagrees with the model's config, naming the
  setting, where loading it would otherwise succeed and compute something else. Files without
  the record load as before.
"""

import contextlib
import os
import re
from typing import Any, Dict, Optional
from urllib.parse import parse_qs

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.file_io import atomic_write, remove_stale_temporaries
from ..utils.user_errors import InputFileNotFoundError, InputValueError
from .arch_record import ARCH_KEY, plain
from .conversion import BACKBONE_SOURCES, convert_state_dict, detect_layout, state_dict_of
from .renaming import ClassCountError, StateDict, fit_dino_heads, map_class_head
from .safe_load import load_restricted_pickle, load_state_dict_file, resolve_weight_file

__all__ = ["CLASS_HEAD_PREFIX", "DabDetrCheckpointer", "TRAINING_MODEL_KEY"]

# With MODEL_EMA, a checkpoint's "model" is the averaged model and this key the trained one.
TRAINING_MODEL_KEY = "training_model"

CLASS_HEAD_PREFIX = "class_embed."
# Tensors with a row per class: re-initialised when the checkpoint has another class count
# (DN-DETR's label embedding has one more, for "no object").
CLASS_HEADS = (CLASS_HEAD_PREFIX, "label_enc.")
class DabDetrCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe loading, class-head replacement, atomic saves and
    an architecture record."""

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        arch: Optional[Dict[str, Any]] = None,
        ema: Optional[torch.optim.swa_utils.AveragedModel] = None,
        **kwargs: Any,
    ):
        """
        Args:
            model, save_dir, kwargs: as for ``DetectionCheckpointer`` (``save_to_disk`` and
                the checkpointables).
            arch: :func:`architecture_record` of the config that built ``model``: saved with
                every checkpoint, and compared with the record of each file loaded. ``None``:
                nothing saved, nothing compared.
            ema: the trainer's average of ``model`` (``MODEL_EMA``): saved as ``"model"``,
                with ``model`` itself under ``"training_model"``. Loading with the
                checkpointables (``--resume``) restores both from such a file; loading
                weights only (``MODEL.WEIGHTS``) puts the averaged ones into ``model``.
        """
        super().__init__(model, save_dir, **kwargs)
        self.arch = arch
        self.ema = ema
        self._resuming = False  # the checkpointables are being loaded too
        self._cleaned = False  # stale temporary files removed from save_dir
        self._loading = "the checkpoint"  # the path being loaded, named in errors
        self._matching_heuristics = False  # requested by the path being loaded

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """``DetectionCheckpointer.load``. As in current Detectron2,
        ``path?matching_heuristics=True`` loads by Detectron2's name-matching heuristics
        (``align_and_update_state_dicts``) instead of exact names; Detectron2 v0.6 would look
        for a file whose name ends in the query."""
        self._loading = path
        self._matching_heuristics = False
        base, _, query = (path or "").partition("?")
        value = parse_qs(query).get("matching_heuristics")
        if value is not None:
            if value not in (["True"], ["False"]):
                raise InputValueError(
                    f"{self._loading}: matching_heuristics must be True or False, got {value}"
                )
            self._matching_heuristics = value == ["True"]
            # any other query (e.g. of a signed URL) stays exactly as written
            rest = [p for p in query.split("&") if p.split("=", 1)[0] != "matching_heuristics"]
            path = base + (f"?{'&'.join(rest)}" if rest else "")
        if path and "://" in path:
            path = self._local_copy(path)
        if path and os.path.isdir(path):  # a transformers model folder: its weight file
            path = resolve_weight_file(path)
        if path and not os.path.isfile(path):
            raise InputFileNotFoundError(
                f"weights file {path} does not exist (MODEL.WEIGHTS takes a file or a URL)"
            )
        checkpointables = kwargs.get("checkpointables", args[0] if args else None)
        self._resuming = checkpointables is None or len(checkpointables) > 0
        return super().load(path, *args, **kwargs)

    def _local_copy(self, url: str) -> str:
        """The file at ``url`` (``http(s)://``, or another scheme of Detectron2's
        ``PathManager``, e.g. ``detectron2://``): downloaded into iopath's cache on first use,
        read from there afterwards."""
        try:
            local = self.path_manager.get_local_path(url)
        except OSError as e:  # urllib's URLError and HTTPError included
            raise InputFileNotFoundError(f"weights {url} could not be downloaded ({e})") from None
        if not os.path.isfile(local):
            raise InputFileNotFoundError(f"weights {url}: no such file")
        return local

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_restricted_pickle(filename)
            if not isinstance(data, dict):
                raise InputValueError(f"{filename}: expected a dict, got {type(data).__name__}")
            if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            data = data.get("blobs", data)  # Caffe2 / Detectron1 model zoo
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = load_state_dict_file(filename)
        weights = state_dict_of(loaded)
        checkpoint = loaded if "model" in loaded else {"model": weights}
        if self._matching_heuristics:  # the names as they are, matched by Detectron2
            return {**checkpoint, "matching_heuristics": True}
        try:
            layout = detect_layout(weights, self.model.state_dict().keys())
        except InputValueError as e:
            raise InputValueError(f"{self._loading}: {e} (with ?matching_heuristics=True after "
                                  "its name, Detectron2 matches the names instead)") from None
        if layout != "dab_detr":
            try:
                checkpoint = {"model": self._convert(layout, weights), "__author__": layout}
            except InputValueError as e:
                raise InputValueError(f"{self._loading}: {e}") from None
        done = {"dab_detr": "loaded as it is", "torchvision": "converted (an ImageNet ResNet: "
                "the backbone's weights only)", "dat": "converted (an ImageNet DAT: the "
                "backbone's weights only)"}.get(layout, "converted")
        self.logger.info(f"{self._loading}: {layout} layout, {done}")
        return checkpoint

    def _convert(self, layout: str, weights: StateDict) -> StateDict:
        """``weights`` in ``layout`` -> this project's names, for the model: its class count,
        its anchor centres fixed (a ``refpoint_xy`` buffer: RANDOM_REFPOINTS_XY) or not."""
        expected = self.model.state_dict()
        out = convert_state_dict(layout, weights, None, "refpoint_xy" in expected)
        heads = [v for k, v in expected.items() if re.fullmatch(r"class_embed\.(0\.)?weight", k)]
        if heads and layout not in BACKBONE_SOURCES:
            # another class count (fine-tuning): _check_shapes drops the head, with a warning
            no_object = self._no_object_row()
            with contextlib.suppress(ClassCountError):
                # e.g. official's 91 rows (DETR's 92) -> 80 classes (DETR's 81)
                map_class_head(out, heads[0].shape[0] - no_object, no_object=bool(no_object))
        return out

    def _no_object_row(self) -> int:
        """1 if the model's class head ends with a "no object" row (DETR), else 0."""
        return int(getattr(self.model, "no_object_class", False))

    def _load_model(self, checkpoint: Dict[str, Any]):
        self._check_arch(checkpoint.get(ARCH_KEY))
        averaged = None
        # resuming a trainer (its state is loaded too) from a MODEL_EMA checkpoint: the model
        # continues from the trained weights, the average (if kept) from "model"
        resuming = self._resuming and bool(self.checkpointables)
        if resuming and TRAINING_MODEL_KEY in checkpoint:
            averaged = checkpoint["model"]
            checkpoint["model"] = checkpoint.pop(TRAINING_MODEL_KEY)
            if self.ema is None:
                self.logger.warning(
                    f"{self._loading} holds a moving average of the weights (MODEL_EMA), "
                    "but MODEL_EMA.ENABLED is False: training continues from the trained "
                    "weights and the average is dropped"
                )
                averaged = None
        if not checkpoint.get("matching_heuristics", False):
            try:
                fit_dino_heads(checkpoint["model"], self.model.state_dict().keys())
            except InputValueError as e:
                raise InputValueError(f"{self._loading}: {e}") from None
            self._check_shapes(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        if averaged is not None:
            self.ema.module.load_state_dict(averaged)
            self.ema.n_averaged.fill_(1)  # an average already: the next update is no copy
        return incompatible

    def _check_arch(self, recorded: Optional[Dict[str, Any]]) -> None:
        """Raise if the file's architecture record disagrees with the model's config."""
        if not recorded or not self.arch:
            return
        wrong = {
            k: (recorded[k], self.arch[k])
            for k in recorded.keys() & self.arch.keys()
            if plain(recorded[k]) != plain(self.arch[k])
        }
        if wrong:
            source = self._loading
            listed = "; ".join(
                f"{k} is {a!r} in the file, {b!r} in the config"
                for k, (a, b) in sorted(wrong.items())
            )
            raise InputValueError(
                f"{source} was saved from a model of another architecture ({listed}). Its "
                "tensors have the same shapes, but the model would compute something else: use "
                "the config it was trained or converted with (e.g. a DC5 checkpoint needs a "
                "*_DC5_* config)."
            )

    def _check_shapes(self, weights: Dict[str, Any]) -> None:
        """Drop a class head of another class count; raise on any other shape mismatch."""
        expected = self.model.state_dict()  # fvcore's Checkpointer unwrapped a DDP model
        # a DDP model's checkpoint: fvcore strips the prefix later; compare without it now
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(weights, "module.")
        wrong = {
            k: (tuple(v.shape), tuple(expected[k].shape))
            for k, v in weights.items()
            if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)
        }
        source = self._loading
        dino = "transformer.proposals.tgt_embed.weight" in expected
        if "label_enc.weight" in weights and "label_enc.weight" not in expected and dino:
            # DINO's label embedding makes the denoising queries only: inference without it is
            # the same
            del weights["label_enc.weight"]
            self.logger.warning(f"{source}: its denoising label embedding (label_enc.weight) is "
                                "not loaded: MODEL.DAB_DETR.DN.ENABLED is False")
        if "label_enc.weight" in weights and "label_enc.weight" not in expected:
            raise InputValueError(
                f"{source} is a DN-DETR checkpoint (it has label_enc.weight: the content queries "
                "come from a label embedding), but the config builds a model without it: set "
                "MODEL.DAB_DETR.DN.ENABLED True (the dn_* configs do)."
            )
        head = {k: s for k, s in wrong.items() if k.startswith(CLASS_HEADS)}
        other = {k: s for k, s in wrong.items() if k not in head}
        if other:
            listed = "; ".join(
                f"{k}: {a} in the file, {b} in the model" for k, (a, b) in other.items()
            )
            raise InputValueError(
                f"{source} does not fit the model built from the config ({listed}). Only the "
                "class head (and label_enc) may differ (then re-initialised); check MODEL.DAB_DETR "
                "(NUM_QUERIES, NUM_PATTERNS, HIDDEN_DIM, ...) and MODEL.RESNETS against the "
                "checkpoint."
            )
        if head:
            name = min(head)  # class_embed.* before label_enc.*, which has one row more
            (file_rows, *_), (model_rows, *_) = head[name]
            extra = int(name.startswith("label_enc.")) or self._no_object_row()
            self.logger.warning(
                f"{source} has a class head for {file_rows - extra} classes, the model "
                f"{model_rows - extra} (MODEL.DAB_DETR.NUM_CLASSES): not loading "
                f"{', '.join(sorted(head))}; these are trained from their initialisation."
            )
            for k in head:
                del weights[k]

    def save(self, name: str, **kwargs: Any) -> None:
        """Same as ``DetectionCheckpointer.save``, but never leaves a half-written file in a
        local ``save_dir`` (other storage, e.g. ``s3://``, goes through Detectron2's
        ``PathManager`` as before). The first save also removes what a save killed mid-write
        (SIGKILL, power loss) left behind there: only the main process saves."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:
            if self.arch:
                kwargs[ARCH_KEY] = self.arch
            if self.ema is not None:  # fvcore's save lets these replace its own "model"
                kwargs["model"] = self.ema.module.state_dict()
                kwargs[TRAINING_MODEL_KEY] = self.model.state_dict()
            return super().save(name, **kwargs)
        if not self._cleaned:
            for pattern in ("*.pth", "last_checkpoint"):
                for tmp in remove_stale_temporaries(self.save_dir, pattern):
                    self.logger.info(f"Removed {tmp}, left by an interrupted save")
            self._cleaned = True
        if self.ema is None:
            data = {"model": self.model.state_dict()}
        else:
            data = {"model": self.ema.module.state_dict(),
                    TRAINING_MODEL_KEY: self.model.state_dict()}
        if self.arch:
            data[ARCH_KEY] = self.arch
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))
