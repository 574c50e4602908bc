#!/usr/bin/env python
"""DAB-DETR for Detectron2. Detectron2 itself is not on PyPI: install it first (see
README.md), or let ``make`` do it (tools/install_detectron2.py)."""

from setuptools import find_packages, setup

setup(
    name="dab_detr",
    version="0.1.0",
    description="DAB-DETR (dynamic anchor boxes as DETR queries) as a Detectron2 project",
    packages=find_packages(include=("dab_detr", "dab_detr.*")),
    python_requires=">=3.8",
    install_requires=[
        # torch and torchvision are not pinned: keep the (CUDA) build you already have.
        "torch>=1.13",
        "torchvision>=0.14",
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
        "dev": ["pytest", "ruff", "transformers>=4.49", "timm"],
    },
)
