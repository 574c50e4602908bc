"""What the official implementations compute, for the equivalence tests.

The authors' code (IDEA-Research/DAB-DETR, IDEA-Research/DN-DETR) was run once, in float64
on CPU, on weights made by a rule from a seed; the data directory holds, per model, the rule's
input (``<model>.json``: every tensor's name, shape and kind of initialisation), the two test
images (``images.npz``) and the outputs of every decoder layer (``<model>_outputs.npz``). Its
``README.md`` defines the rule, which :func:`official_state_dict` implements.

Shapes: L decoder layers, B batch, Q queries, K = 91 classes indexed by COCO category id.
"""

import json
import math
import os
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "DETR_REFERENCE_DIR", "DINO_REFERENCE_DIR", "INITS", "REFERENCE_DIR", "load_images",
    "load_outputs", "official_state_dict", "stack_layers",
]

# The official outputs and their README (copied from the project's shared reference folder).
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official_outputs")
# The same for DETR and Conditional DETR (facebookresearch/detr, Atten4Vis/ConditionalDETR).
DETR_REFERENCE_DIR = os.path.join(os.path.dirname(REFERENCE_DIR), "detr_outputs")
# The same for DINO (IDEA-Research/DINO), with the selected encoder proposals.
DINO_REFERENCE_DIR = os.path.join(os.path.dirname(REFERENCE_DIR), "dino_outputs")

# init kind -> value of the tensor from z ~ N(0, 1) of its shape (the README's table)
INITS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # linear and convolution weights, packed attention projections
    "fan_in": lambda z: z / math.sqrt(math.prod(z.shape[1:])),
    "scale": lambda z: 1 + 0.1 * z,  # norm weights
    "shift": lambda z: 0.1 * z,  # biases, BatchNorm running means
    "var": lambda z: 0.5 + torch.sigmoid(z),  # BatchNorm running variances
    "embed": lambda z: z,  # embeddings: anchors, content queries, patterns, level embeddings
    "slope": lambda z: 0.25 + 0.1 * z,  # PReLU slopes
}


def official_state_dict(
    json_path: str, keep: Optional[Callable[[dict], torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """The official state dict described by ``json_path``, in float64, in the listed order.

    Each tensor is ``INITS[init](z)`` with ``z = torch.randn(shape, dtype=float64)`` drawn from
    a generator seeded with ``seed + crc32(key)``: a tensor's value depends on its name only,
    not on the order of the listing. An entry with ``same_as`` takes that earlier entry's value;
    one with init ``keep`` (a constant of the sizes, e.g. DAT's window index) is ``keep(entry)``.
    """
    with open(json_path) as f:
        spec = json.load(f)
    seed = spec["seed"]
    sd = {}
    for entry in spec["entries"]:
        key, shape, init = entry["key"], entry["shape"], entry["init"]
        if "same_as" in entry:
            # one module under several names (DINO's shared heads): the first name's value
            sd[key] = sd[entry["same_as"]]
            continue
        if init == "keep" and keep is not None:
            sd[key] = keep(entry)
            continue
        if init not in INITS:
            raise ValueError(f"{json_path}: {key} has an unknown init {init!r}")
        g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        sd[key] = INITS[init](z)
    return sd


def load_images(path: str) -> Dict[str, torch.Tensor]:
    """``{name: (3, H, W) uint8 RGB}`` of ``images.npz``."""
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def load_outputs(path: str, run: str) -> Dict[str, torch.Tensor]:
    """One run's reference outputs, float32 copies of float64 results: ``logits``
    ``(L, B, Q, K)`` before the sigmoid, and ``boxes`` ``(L, B, Q, 4)`` cxcywh normalised by
    each image's own (unpadded) size; first decoder layer first."""
    with np.load(path) as data:
        # DINO's also have interm_logits (B, Q, K) and interm_boxes (B, Q, 4)
        keys = [k[len(run) + 1 :] for k in data.files if k.startswith(f"{run}_")]
        return {k: torch.from_numpy(data[f"{run}_{k}"]) for k in keys}


def stack_layers(outputs: Dict[str, object], key: str) -> torch.Tensor:
    """``(L, B, Q, ...)`` of ``key`` over the layers of a ``forward_predictions`` result with
    ``aux_outputs``: the earlier layers first, the last (``outputs[key]``) at the end."""
    layers: List[torch.Tensor] = [aux[key] for aux in outputs["aux_outputs"]]
    return torch.stack(layers + [outputs[key]])


# run -> images, batched in this order (the reference outputs' three runs)
RUNS = {"batch": ("image0", "image1"), "image0": ("image0",), "image1": ("image1",)}
# one run's (logits (L, B, Q, K), boxes (L, B, Q, 4)), every decoder layer, first layer first
Prediction = Tuple[torch.Tensor, torch.Tensor]


def prediction_runner(
    model: torch.nn.Module, images: Dict[str, torch.Tensor]
) -> Callable[[str], Prediction]:
    """``run(name)`` -> the model's :data:`Prediction` for the images ``RUNS[name]`` names,
    batched as the reference was; each run computed once."""
    cache: Dict[str, Prediction] = {}

    def run(name: str) -> Prediction:
        if name not in cache:
            with torch.no_grad():
                batch = model.preprocess_image([{"image": images[k]} for k in RUNS[name]])
                outputs = model.forward_predictions(batch, with_aux=True)
            cache[name] = stack_layers(outputs, "pred_logits"), stack_layers(outputs, "pred_boxes")
        return cache[name]

    return run


def reference_outputs(reference_dir: str, model_name: str, run: str) -> Dict[str, torch.Tensor]:
    """The stored outputs of ``model_name`` for ``run``, in float64."""
    ref = load_outputs(os.path.join(reference_dir, f"{model_name}_outputs.npz"), run)
    return {k: v.double() for k, v in ref.items()}


def assert_layers_close(ours: torch.Tensor, ref: torch.Tensor, what: str, **tol) -> None:
    """Layer by layer, first layer first, so that a failure names the first that diverges."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    for layer in range(ref.shape[0]):
        torch.testing.assert_close(ours[layer], ref[layer], **tol,
                                   msg=lambda m, layer=layer: f"{what}, decoder layer {layer}: {m}")
