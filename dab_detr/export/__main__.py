"""Export a config of this project (DAB-DETR, DAB-Deformable-DETR, DETR, Conditional DETR,
DINO) to ONNX and check it against onnxruntime.

Usage::

    python -m dab_detr.export --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml \\
        --output dab_detr_R_50.onnx --opts MODEL.WEIGHTS dab_detr_R_50.pth

The graph (batch B, height H and width W dynamic; opset 20, see dab_detr/export/exporter.py):

  images       (B, 3, H, W) float32: the images, channels in the config's INPUT.FORMAT order
               (RGB for this project's configs), in 0-255, minus MODEL.PIXEL_MEAN and divided by
               MODEL.PIXEL_STD (both in that order), then padded with zeros at the bottom and
               right to a common H x W: what the model's preprocess_image does. Resize them
               first as the config's test-time resize does (INPUT.MIN_SIZE_TEST and
               MAX_SIZE_TEST: short side 800, long side at most 1333 for COCO).
  image_sizes  (B, 2) int64: (h, w) of each image before padding. The padding mask, its
               downsampled copies and the position encodings are computed from them in the
               graph, so an image's detections do not depend on what it is batched with
               (but with a DAT backbone, which PyTorch runs on each image alone and the graph
               on the padded batch as one: give it one image per call, or images of one
               padded size, for PyTorch's detections).
  scores       (B, S) float32: sigmoid scores, best first; S = min(NUM_SELECT, queries x
               classes) (DINO: queries = min(NUM_QUERIES, encoder tokens), fewer on a small
               image).
  classes      (B, S) int64: class indices into the dataset's thing classes.
  boxes        (B, S, 4) float32: XYXY in pixels of the unpadded input image (not clipped, as
               model.inference returns them; Detectron2's detector_postprocess then clips and
               rescales to the original image).

The file's metadata_props hold the normalisation (dab_detr.pixel_mean, dab_detr.pixel_std,
dab_detr.input_format). With --check (the default) onnxruntime runs the file on random images
of other sizes than the export's, one alone and two padded into a batch (DAT: each alone),
and the command fails
unless every score is within --score-tolerance and every box coordinate within
--box-tolerance pixels of PyTorch's model.inference.
"""

import argparse
import json
import logging
import sys
from typing import List, Optional, Tuple

from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from ..checkpoint import DabDetrCheckpointer, architecture_record
from ..config import get_dab_detr_cfg
from ..utils.user_errors import debug_requested, report_user_errors
from .check import check_onnx
from .exporter import check_exportable, export_onnx
from .wrapper import ExportError

logger = logging.getLogger("dab_detr.export")


def check_sizes(height: int, width: int, alone: bool = False) -> List[List[Tuple[int, int]]]:
    """The batches checked: one image, then two padded together (``alone``: each alone), all
    of sizes other than the export's ``(height, width)`` and not multiples of any stride."""
    a = (height + height // 8 + 3, max(width - width // 8 - 5, 1))
    b = (max(height - height // 4 - 7, 1), width + width // 16 + 1)
    return [[a], [b]] if alone else [[a], [a, b]]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dab_detr.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a DAB-DETR YAML config")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--example-size", type=int, nargs=2, metavar=("H", "W"),
                        help="the example batch's size (default: INPUT.MIN_SIZE_TEST x 4/3 of "
                        "it); the graph runs at any size")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare onnxruntime with PyTorch (default: on)")
    parser.add_argument("--score-tolerance", type=float, default=1e-4)
    parser.add_argument("--box-tolerance", type=float, default=1e-3, help="in pixels")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE pairs overriding the config (MODEL.WEIGHTS ...)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the inputs (or DAB_DETR_DEBUG=1)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # this package's messages; the exporter's own (onnxscript's optimiser) only from warnings
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("dab_detr").setLevel(logging.INFO)
    # the graph is captured on the CPU; the file runs on any onnxruntime provider
    cfg = get_dab_detr_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    try:
        check_exportable(cfg)
        seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # reproducible without weights
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            DabDetrCheckpointer(model, arch=architecture_record(cfg)).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: exporting a random initialisation")
        model.eval()
        size = args.example_size or (cfg.INPUT.MIN_SIZE_TEST,
                                     min(cfg.INPUT.MIN_SIZE_TEST * 4 // 3, cfg.INPUT.MAX_SIZE_TEST))
        metadata = {
            "dab_detr.meta_architecture": cfg.MODEL.META_ARCHITECTURE,
            "dab_detr.config_file": args.config_file,
            "dab_detr.input_format": cfg.INPUT.FORMAT,
            "dab_detr.pixel_mean": json.dumps(list(cfg.MODEL.PIXEL_MEAN)),
            "dab_detr.pixel_std": json.dumps(list(cfg.MODEL.PIXEL_STD)),
            "dab_detr.num_classes": str(cfg.MODEL.DAB_DETR.NUM_CLASSES),
        }
        export_onnx(model, args.output, tuple(size), metadata)
        if args.check:
            # a backbone that runs each image alone (DAT) does so in PyTorch only: the graph
            # runs the padded batch as one, so it is checked on single images
            alone = getattr(model.backbone, "takes_image_sizes", False)
            report = check_onnx(args.output, model, check_sizes(*size, alone),
                                args.score_tolerance, args.box_tolerance)
            logger.info("check passed: max |score diff| %.3g (tolerance %g), max |box diff| "
                        "%.3g px (tolerance %g)", report.max_score_diff, args.score_tolerance,
                        report.max_box_diff, args.box_tolerance)
    except (ExportError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    with report_user_errors("python -m dab_detr.export", debug=debug_requested()):
        main()
