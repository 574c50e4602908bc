#!/usr/bin/env python
"""Detect objects in images with a DAB-DETR config and draw them with Detectron2's Visualizer.

    python demo/demo.py --config-file configs/quick_schedules/dn_dab_detr_R_18_shapes.yaml \\
        --input img.jpg more/ "shots/*.png" --output out/ --confidence-threshold 0.5 \\
        --json detections.json --opts MODEL.WEIGHTS output/dn_dab_detr_R_18_shapes/model_final.pth

``--input`` takes image files, folders (their images) and glob patterns. ``--output`` is a
folder (created; one picture per input, named after it) or, for a single input, a file
name with an image extension. Class names come from the metadata of
``cfg.DATASETS.TEST[0]`` (the built-in ``dab_shapes_*`` datasets and Detectron2's COCO
datasets are registered). ``MODEL.DEVICE`` picks the device; a CUDA config falls back to the
CPU, with a warning, on a machine without CUDA.
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import argparse
import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from dab_detr.data import register_builtin_datasets
from dab_detr.data.images import read_image
from dab_detr.engine.predictor import build_predictor, setup_cfg
from dab_detr.utils.user_errors import (
    InputFileNotFoundError,
    debug_requested,
    report_user_errors,
)

logger = logging.getLogger("dab_detr.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DAB-DETR demo: detect and draw")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="images, folders of images or glob patterns ('dir/*.jpg')")
    parser.add_argument("--output", required=True,
                        help="folder for the pictures, or a file name for a single input")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the detections drawn and saved")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the detections of every image to this JSON file")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS m.pth")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the inputs (or DAB_DETR_DEBUG=1)")
    return parser


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image paths from files, folders (sorted, by extension) and glob patterns, in order
    and without repeats."""
    paths: List[str] = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
        else:
            found = [item]
        if not found:
            raise InputFileNotFoundError(f"--input {item!r} matches no image")
        paths += [p for p in found if p not in paths]
    return paths


def output_paths(inputs: Sequence[str], output: str) -> List[str]:
    """One output picture per input: ``output`` itself for a single input when it names an
    image file, else ``output/<input name>`` (made unique when two inputs share a name)."""
    if len(inputs) == 1 and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(
        output
    ):
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        return [output]
    os.makedirs(output, exist_ok=True)
    names: List[str] = []
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        name, n = stem + ext, 1
        while name in names:
            name, n = f"{stem}_{n}{ext}", n + 1
        names.append(name)
    return [os.path.join(output, name) for name in names]


def to_records(instances: Instances, class_names: Optional[Sequence[str]]) -> List[Dict]:
    """Detections as JSON-ready dicts: ``bbox`` XYXY in the original image's pixels."""
    records = []
    boxes = instances.pred_boxes.tensor.tolist()
    for box, score, cls in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()):
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        records.append({"bbox": [round(v, 2) for v in box], "score": round(score, 4),
                        "category_id": cls, "category": name})
    return records


def run_on_image(predictor: DefaultPredictor, image_bgr: np.ndarray, metadata,
                 threshold: float):
    """Detections above ``threshold`` (on the CPU) and their picture (a ``VisImage``)."""
    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata)  # Visualizer draws RGB
    return instances, visualizer.draw_instance_predictions(instances)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """Run the demo; returns the per-image records that ``--json`` writes."""
    args = get_parser().parse_args(argv)
    setup_logger(name="dab_detr")
    register_builtin_datasets()  # cheap: generates nothing
    cfg = setup_cfg(args.config_file, args.opts)
    predictor = build_predictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    class_names = metadata.get("thing_classes", None)

    inputs = expand_inputs(args.input)
    results = []
    for path, out_path in zip(inputs, output_paths(inputs, args.output)):
        image = read_image(path, "BGR")  # DefaultPredictor takes BGR, as cv2 reads
        instances, picture = run_on_image(predictor, image, metadata,
                                          args.confidence_threshold)
        Image.fromarray(picture.get_image()).save(out_path)  # any format PIL writes
        logger.info("%s: %d detections -> %s", path, len(instances), out_path)
        results.append({"file_name": path, "height": image.shape[0], "width": image.shape[1],
                        "detections": to_records(instances, class_names)})
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        logger.info("wrote %s", args.json)
    return results


if __name__ == "__main__":
    with report_user_errors("demo/demo.py", debug=debug_requested()):
        main()
