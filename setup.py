#!/usr/bin/env python
"""DAB-DETR for Detectron2. Detectron2 itself is not on PyPI: install it first (see
README.md), or let ``make`` do it (tools/install_detectron2.py)."""

import glob
import os
import shutil
from typing import List

from setuptools import find_packages, setup


def get_model_zoo_configs() -> List[str]:
    """Put configs/ inside the package as dab_detr/model_zoo/configs (git-ignored), so that a
    wheel installs them for dab_detr.model_zoo (as Detectron2's setup.py does), and return
    them as package data (paths relative to dab_detr/model_zoo)."""
    root = os.path.dirname(os.path.realpath(__file__))
    source = os.path.join(root, "configs")
    destination = os.path.join(root, "dab_detr", "model_zoo", "configs")
    if os.path.isdir(source):  # else (no configs/ beside setup.py) a copy already there is used
        # a stale link or copy from an earlier build
        if os.path.islink(destination):
            os.unlink(destination)
        elif os.path.isdir(destination):
            shutil.rmtree(destination)
        try:
            os.symlink(os.path.relpath(source, os.path.dirname(destination)), destination)
        except OSError:  # no symlinks (e.g. Windows without the privilege)
            shutil.copytree(source, destination)
    package = os.path.join(root, "dab_detr", "model_zoo")
    return [os.path.relpath(p, package) for p in
            glob.glob(os.path.join(destination, "**", "*.yaml"), recursive=True)]


setup(
    name="dab_detr",
    version="0.1.0",
    description="DAB-DETR (dynamic anchor boxes as DETR queries) as a Detectron2 project",
    packages=find_packages(include=("dab_detr", "dab_detr.*")),
    package_data={"dab_detr.model_zoo": get_model_zoo_configs()},
    # `X | Y` annotations evaluated at run time and zip(strict=...): Python 3.10. Tested on
    # 3.11; ruff (pyproject.toml, target-version py310) refuses newer syntax.
    python_requires=">=3.10",
    install_requires=[
        # torch and torchvision are not pinned: keep the (CUDA) build you already have.
        # The floors: scaled_dot_product_attention and keyword-argument module hooks (torch
        # 2.0, with torchvision 0.15). Tested with torch 2.14.1 / torchvision 0.29.1.
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "iopath",
        "pycocotools>=2.0.2",
        "scipy",
        "numpy",
        "Pillow",
        "matplotlib",
        "opencv-python-headless",  # Detectron2's Visualizer imports cv2
        "safetensors",
        "tensorboard",
    ],
    extras_require={
        # triton: the deformable attention kernels' tests run in its interpreter on CPU; the
        # package runs without it (CUDA wheels of torch bring it for the GPU kernels). Tested
        # with triton 3.8.0.
        # submitit: tests/test_slurm.py (tools/run_with_submitit.py in a fake Slurm job).
        "dev": ["pytest", "ruff", "transformers>=4.49", "timm",
                "onnx", "onnxscript", "onnxruntime",
                "triton; platform_system == 'Linux'",  # its only wheels
                "submitit"],
        # python -m dab_detr.export: torch.onnx's torch.export-based exporter (onnx,
        # onnxscript) and its check (onnxruntime). Tested with onnx 1.23.2, onnxscript 0.7.2,
        # onnxruntime 1.32.0.
        "export": ["onnx", "onnxscript", "onnxruntime"],
        # tools/run_with_submitit.py: training on a Slurm cluster. Tested with submitit 1.5.4.
        "slurm": ["submitit"],
    },
)
