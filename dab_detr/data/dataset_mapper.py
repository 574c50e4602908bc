"""DETR's data augmentation as a Detectron2 dataset mapper.

DAB-DETR trains with the augmentation of DETR (facebookresearch/detr, ``datasets/coco.py``,
``make_coco_transforms``): a horizontal flip, then with probability 0.5 either a multi-scale
resize, or a resize to a short edge in (400, 500, 600) (``INPUT.CROP.PRE_RESIZE_SHORT_EDGES``),
a random crop and the same multi-scale resize. ``DabDetrDatasetMapper`` expresses that pipeline
with Detectron2's augmentation API, so it draws its random numbers from ``np.random``
(``dab_detr.engine`` seeds it per sample).

Bad data is reported, never passed on to crash deep inside the model: an image that cannot be
read raises :class:`~dab_detr.data.images.UnreadableImageError` naming the file (or, with
``DATALOADER.SKIP_UNREADABLE_IMAGES``, the training mapper returns ``None``: ``dab_detr.engine``
takes another image; Detectron2's ``MapDataset`` would too, but fails on Python >= 3.11).
Boxes were checked before: :func:`~dab_detr.data.annotations.check_annotations`.
"""

import copy
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .images import UnreadableImageError, read_image

__all__ = ["DabDetrDatasetMapper", "RandomSelect", "build_dab_detr_augmentation"]

logger = logging.getLogger(__name__)

# Annotation fields DAB-DETR never reads; dropping them before the copy and the transforms
# saves the (possibly large) polygon copies and their transformation.
_UNUSED_ANNOTATION_KEYS = ("segmentation", "keypoints")

AugOrTransform = T.Augmentation | T.Transform


class RandomSelect(T.Augmentation):
    """Apply one of two augmentations: the first with probability ``prob``, else the second.

    ``T.RandomApply`` can only choose between an augmentation and nothing; DETR's pipeline
    needs an either/or choice. The coin is drawn from ``np.random`` like every Detectron2
    augmentation, so Detectron2's seeding makes it reproducible.
    """

    def __init__(self, aug_a: AugOrTransform, aug_b: AugOrTransform, prob: float = 0.5):
        """
        Args:
            aug_a: augmentation (or list of them, applied in order) taken with probability
                ``prob``.
            aug_b: augmentation (or list of them) taken otherwise.
            prob: probability of ``aug_a``, in [0, 1].
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.aug_a = _as_augmentation(aug_a)
        self.aug_b = _as_augmentation(aug_b)
        self.prob = prob

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        """Augment ``aug_input`` in place with one of the two branches.

        Args:
            aug_input: the input to augment.

        Returns:
            The transform that was applied.
        """
        # A branch may be a list of augmentations, whose later members need the output of
        # the earlier ones, so the choice is made in __call__ rather than get_transform.
        if np.random.rand() < self.prob:
            return self.aug_a(aug_input)
        return self.aug_b(aug_input)


def _as_augmentation(aug: AugOrTransform | Sequence[AugOrTransform]) -> T.Augmentation:
    """Wrap a transform, or a list of augmentations/transforms, into one ``Augmentation``."""
    if isinstance(aug, T.Augmentation):
        return aug
    if isinstance(aug, T.Transform):
        return T.AugmentationList([aug])
    return T.AugmentationList(list(aug))


def build_dab_detr_augmentation(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Build DETR's augmentation list from ``cfg``.

    Keys read: ``INPUT.MIN_SIZE_TRAIN``, ``INPUT.MAX_SIZE_TRAIN``,
    ``INPUT.MIN_SIZE_TRAIN_SAMPLING``, ``INPUT.CROP.ENABLED``, ``INPUT.CROP.SIZE`` in training;
    ``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST`` in inference.

    Args:
        cfg: a Detectron2 config.
        is_train: build the training pipeline (random) or the inference one (a resize).

    Returns:
        The augmentations, to be applied in order.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    def multi_scale_resize() -> T.Augmentation:
        return T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN,
            cfg.INPUT.MAX_SIZE_TRAIN,
            sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        )

    augs: list[T.Augmentation] = [T.RandomFlip(horizontal=True, vertical=False)]
    if not cfg.INPUT.CROP.ENABLED:
        augs.append(multi_scale_resize())
        return augs
    crop_size = tuple(cfg.INPUT.CROP.SIZE)
    # Detectron2's default CROP.SIZE (0.9, 0.9) is relative; read as absolute pixels it would
    # crop nothing useful, so fail early instead of training on degenerate crops.
    if len(crop_size) != 2 or not 1 <= crop_size[0] <= crop_size[1]:
        raise ValueError(
            f"INPUT.CROP.SIZE must be an absolute (min, max) range in pixels, e.g. (384, 600); "
            f"got {crop_size}"
        )
    pre_resize = tuple(cfg.INPUT.CROP.PRE_RESIZE_SHORT_EDGES)
    if not pre_resize or min(pre_resize) < 1:
        raise ValueError(
            "INPUT.CROP.PRE_RESIZE_SHORT_EDGES must be short edges in pixels, e.g. "
            f"(400, 500, 600); got {pre_resize}"
        )
    crop_branch = [
        # DETR's RandomResize([400, 500, 600]) has no max size: sys.maxsize reproduces it
        # (the following crop bounds the size anyway).
        T.ResizeShortestEdge(pre_resize, sys.maxsize, sample_style="choice"),
        # DETR's RandomSizeCrop draws absolute sizes, so the crop type is fixed here and
        # INPUT.CROP.TYPE (whose Detectron2 default is "relative_range") is not read.
        T.RandomCrop("absolute_range", crop_size),
        multi_scale_resize(),
    ]
    augs.append(RandomSelect(multi_scale_resize(), crop_branch, prob=0.5))
    return augs


class DabDetrDatasetMapper:
    """Map a Detectron2 dataset dict to DAB-DETR's input, with DETR's augmentation.

    The callable reads the image, applies the augmentations, and returns the dict with a CHW
    uint8 tensor ``image`` and, in training, ``instances`` holding ``gt_boxes`` (XYXY, in the
    output image, clipped to it, empty ones dropped) and ``gt_classes``. Crowd annotations are
    dropped; an image left with no box is kept with zero instances, which DETR's set loss
    handles. In inference ``annotations`` are removed.

    An image that cannot be read raises :class:`UnreadableImageError`; a training mapper built
    with ``skip_unreadable`` logs a warning naming the file and returns ``None`` instead.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[AugOrTransform],
        image_format: str = "RGB",
        skip_unreadable: bool = False,
    ):
        """
        Args:
            is_train: whether the mapper produces training data (with ``instances``).
            augmentations: augmentations or deterministic transforms, applied in order.
            image_format: an image format accepted by ``detection_utils.read_image``.
            skip_unreadable: in training, return ``None`` for an unreadable image (the data
                loader then takes another one) instead of raising. Inference always raises:
                an evaluation must not silently miss images.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.skip_unreadable = skip_unreadable and is_train
        mode = "training" if is_train else "inference"
        logger.info("[DabDetrDatasetMapper] Augmentations used in %s: %s", mode, augmentations)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        """Constructor arguments from ``cfg`` (see ``build_dab_detr_augmentation``).

        Args:
            cfg: a Detectron2 config; ``INPUT.FORMAT`` gives the image format,
                ``DATALOADER.SKIP_UNREADABLE_IMAGES`` whether training skips unreadable images.
            is_train: whether the mapper produces training data.

        Returns:
            Keyword arguments of ``__init__``.
        """
        return {
            "is_train": is_train,
            "augmentations": build_dab_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "skip_unreadable": cfg.DATALOADER.SKIP_UNREADABLE_IMAGES,
        }

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        """Map one dataset dict; the input dict is not modified.

        Args:
            dataset_dict: metadata of one image in Detectron2's dataset format.

        Returns:
            The mapped dict: the input's fields plus ``image`` and, in training, ``instances``;
            ``None`` for an unreadable image when skipping them.

        Raises:
            UnreadableImageError: naming the file, unless skipping unreadable images.
        """
        annotations = dataset_dict.get("annotations")
        dataset_dict = {k: v for k, v in dataset_dict.items() if k != "annotations"}
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = read_image(dataset_dict["file_name"], self.image_format)
        except UnreadableImageError as e:
            if not self.skip_unreadable:
                raise UnreadableImageError(
                    f"{e} (fix or remove it, or set DATALOADER.SKIP_UNREADABLE_IMAGES True to "
                    "train without such images)"
                ) from e.__cause__
            logger.warning("Skipping an unreadable training image: %s", e)
            return None
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        # Shared-memory tensors travel between dataloader workers far faster than arrays.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            dataset_dict["instances"] = self._transform_annotations(
                annotations or [], transforms, image.shape[:2]
            )
        return dataset_dict

    @staticmethod
    def _transform_annotations(
        annotations: list[dict[str, Any]], transforms: T.TransformList, image_shape: tuple[int, int]
    ) -> Instances:
        """Transform the non-crowd boxes and keep those not emptied by the augmentation.

        Args:
            annotations: the image's annotations (not modified).
            transforms: the transforms applied to the image.
            image_shape: (height, width) of the transformed image.

        Returns:
            ``Instances`` with ``gt_boxes`` and ``gt_classes``, possibly with zero boxes.
        """
        annos = [
            utils.transform_instance_annotations(
                # A per-annotation copy without the unused keys: the transform edits in place.
                {k: copy.deepcopy(v) for k, v in obj.items() if k not in _UNUSED_ANNOTATION_KEYS},
                transforms,
                image_shape,
            )
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape)
        # transform_instance_annotations clips already; clip again so the invariant does not
        # depend on that helper's implementation.
        instances.gt_boxes.clip(image_shape)
        # A box outside a crop is clipped to zero width or height: it has no object left.
        return instances[instances.gt_boxes.nonempty()]
