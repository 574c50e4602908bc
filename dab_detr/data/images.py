"""Reading images for training and inference, with errors that name the file.

:func:`read_image` is Detectron2's ``detection_utils.read_image`` (EXIF orientation applied,
any PIL mode converted) with one fix, 16-bit grayscale kept to its high byte instead of
saturating, and one difference: a missing, truncated or non-image file raises
:class:`UnreadableImageError` naming it.
"""

import logging

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = ["UnreadableImageError", "read_image"]

logger = logging.getLogger(__name__)

# What PIL raises for a missing, truncated, empty or non-image file (SyntaxError and ValueError
# for some corrupt headers), and for an image above its decompression-bomb limit.
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """An image file is missing, truncated or not an image."""


def read_image(file_name: str, image_format: str) -> np.ndarray:
    """Detectron2's ``read_image`` (EXIF orientation applied, any PIL mode converted), with
    16-bit grayscale kept to its high byte instead of saturating, and errors naming the file.

    Args:
        file_name: path of the image.
        image_format: a format accepted by ``detection_utils.read_image`` (e.g. "RGB", "BGR").

    Returns:
        ``(H, W, C)`` uint8 array in ``image_format``, in the orientation its EXIF tag gives.

    Raises:
        UnreadableImageError: the file is missing, truncated or not an image.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: a truncated file fails here, not later
    except _READ_ERRORS as e:
        raise UnreadableImageError(f"cannot read image {file_name}: {e}") from e
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block: keep the stored orientation, as Detectron2
        logger.warning(f"{file_name}: EXIF orientation not applied ({e})")
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's convert("RGB") clips 16-bit values at 255 (a white image); PIL already reads
        # 16-bit colour PNGs as their high bytes, so do the same for grayscale.
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((pixels.clip(0, 65535) >> 8).astype(np.uint8))
    return utils.convert_PIL_to_numpy(image, image_format)
