"""What detrex's own models compute, for the equivalence tests of ``--source detrex``.

IDEA-Research/detrex was run once, in float64 on CPU, on weights made by the rule of the
official reference (``official_reference.py``, same seed and ``INITS``) with two changes:
a tensor that detrex's state dict holds under two names is drawn once, from the name in its
``tied_to``, and every value is rounded to float32, as a release holds it. The data directory
holds, per model, ``<model>.json`` (every tensor's name, shape and init), the outputs of
every decoder layer (``<model>_outputs.npz``, read by ``official_reference.load_outputs``) and
the two test images (``images.npz``); its ``README.md`` says how they were made.
"""

import json
import os
import zlib
from typing import Any, Dict

import torch

from official_reference import INITS

__all__ = ["REFERENCE_DIR", "detrex_checkpoint", "detrex_state_dict"]

# detrex's outputs and their README (copied from the project's shared reference folder)
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "detrex_outputs")


def detrex_state_dict(json_path: str) -> Dict[str, torch.Tensor]:
    """detrex's state dict described by ``json_path``, float32, in the listed order, both
    names of a tied tensor included (equal values, separate tensors, as ``torch.load`` gives
    them back).

    Each tensor is ``INITS[init](z).float()`` with ``z = torch.randn(shape, dtype=float64)``
    drawn from a generator seeded with ``seed + crc32(name)``, ``name`` being the entry's
    ``tied_to`` if it has one, else its key.
    """
    with open(json_path) as f:
        spec = json.load(f)
    if spec.get("round_to") != "float32":
        raise ValueError(f"{json_path}: expected round_to float32, got {spec.get('round_to')!r}")
    sd = {}
    for entry in spec["entries"]:
        key, shape, init = entry["key"], entry["shape"], entry["init"]
        if init not in INITS:
            raise ValueError(f"{json_path}: {key} has an unknown init {init!r}")
        name = entry.get("tied_to", key)
        g = torch.Generator().manual_seed(spec["seed"] + zlib.crc32(name.encode()))
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        sd[key] = INITS[init](z).float()
    return sd


def detrex_checkpoint(model: Dict[str, torch.Tensor], iteration: int = 369_999) -> Dict[str, Any]:
    """``model`` in the layout of a file that detrex's training writes (fvcore's
    ``Checkpointer.save`` through ``DetectionCheckpointer(model, trainer=trainer)``): the state
    dict under ``"model"`` beside the trainer's state, an AdamW's ``state_dict()`` included
    (that of a one-element parameter after one step, to keep the file small)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=1e-4)
    param.grad = torch.ones(1)
    optimizer.step()
    trainer = {
        "iteration": iteration,
        "hooks": {"LRScheduler": {"base_lrs": [1e-4], "last_epoch": iteration}},
        "optimizer": optimizer.state_dict(),
    }
    return {"model": model, "trainer": trainer, "iteration": iteration}
