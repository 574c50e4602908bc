"""Convert released DAB-DETR weights into Detectron2 checkpoints of this project.

Usage::

    python -m dab_detr.convert DAB_DETR_R50.pth dab_detr_R_50.pth  # --source auto
    python -m dab_detr.convert --source official DAB_DETR_R50.pth dab_detr_R_50.pth
    python -m dab_detr.convert --source transformers dab-detr-resnet-50/ out.pth
    python -m dab_detr.convert --source transformers --config-file CONFIG detr-resnet-50/ out.pth
    python -m dab_detr.convert --source torchvision resnet50-0676ba61.pth R-50.pth
    python -m dab_detr.convert --source dat dat_tiny_in1k_224.pth DAT-T.pth
    python -m dab_detr.convert --source detrex --config-file CONFIG dab_detr_r50_50ep.pth out.pth
    # with --config-file the result is checked against the model that config builds
    # (and anchors are laid out for RANDOM_REFPOINTS_XY models)

Sources:
  auto          the default: the layout the names show (``detect_layout``: one of those
                below; a file of this project's names, or of none, is refused).
  official      ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/DAB-DETR (DAB-DETR,
                DAB-Deformable-DETR) and IDEA-Research/DN-DETR (their DN models), released
                or written by the ``main.py`` of either.
  transformers  ``DabDetrForObjectDetection``, ``DetrForObjectDetection`` or
                ``ConditionalDetrForObjectDetection`` weights (DAB-DETR, DETR, Conditional
                DETR): a directory, ``.safetensors`` or ``.bin``.
  torchvision   an ImageNet ResNet state dict, for ``MODEL.WEIGHTS`` when training on COCO.
  dat           an official DAT ImageNet checkpoint (LeapLabTHU/DAT), for ``MODEL.WEIGHTS``
                with ``MODEL.BACKBONE.NAME "build_dat_backbone"``.
  detrex        ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/detrex: DAB-DETR
                (R50, R50-DC5), DN-DETR and one-stage DAB-Deformable-DETR.

The output is ``{"model": state_dict, "__author__": ...}`` for ``DetectionCheckpointer``, with
``--config-file`` also ``"dab_detr_arch"``: the config's architecture record, which
``DabDetrCheckpointer`` compares with the config that loads the file. ``MODEL.WEIGHTS`` takes
all of these as they are too (``DabDetrCheckpointer`` converts them while loading).
Nothing is unpickled beyond tensors, plain containers and the official training script's
``argparse.Namespace`` (see ``dab_detr/checkpoint/safe_load.py``).
"""

import argparse
import logging
import os
from typing import List, Optional

import torch

from .checkpoint import (
    ARCH_KEY,
    BACKBONE_SOURCES,
    CONVERTERS,
    architecture_record,
    convert,
    detect_layout,
    load_state_dict_file,
    state_dict_of,
)
from .config import get_dab_detr_cfg
from .utils.user_errors import InputValueError, debug_requested, report_user_errors

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="auto", choices=["auto", *sorted(CONVERTERS)],
                        help="layout of the input (default: auto, recognised from its names)")
    parser.add_argument("--config-file", default="", help="check against (and lay out for) it")
    parser.add_argument("input", help="checkpoint file, or a transformers model directory")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the inputs (or DAB_DETR_DEBUG=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = None
    if args.config_file:
        cfg = get_dab_detr_cfg(args.config_file)
    loaded = load_state_dict_file(args.input)
    source = args.source
    try:
        if source == "auto":
            source = detect_layout(state_dict_of(loaded))
            logger.info("%s: %s layout", args.input, source)
        sd = convert(source, loaded, cfg)  # refuses this project's own layout: nothing to do
    except InputValueError as e:
        raise InputValueError(f"{args.input}: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    data = {"model": sd, "__author__": f"dab_detr.convert --source {source}"}
    if cfg is not None and source not in BACKBONE_SOURCES:
        # DabDetrCheckpointer refuses the file for a config of another architecture (DC5 ...)
        data[ARCH_KEY] = architecture_record(cfg)
    torch.save(data, args.output)
    logger.info("wrote %d tensors to %s", len(sd), args.output)


if __name__ == "__main__":
    with report_user_errors("python -m dab_detr.convert", debug=debug_requested()):
        main()
