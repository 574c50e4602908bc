"""Initialisation that PyTorch's modules do not do by themselves."""

from typing import Sequence

import torch
from torch import nn

__all__ = ["copy_first_parameters"]


@torch.no_grad()
def copy_first_parameters(modules: Sequence[nn.Module]) -> None:
    """Give every module of ``modules`` the parameter values of the first, matched by name.

    The official implementations build a stack of layers (and Deformable DETR its per-layer
    heads) as deep copies of one initialised module (``_get_clones``), so the copies start
    equal; whatever is redrawn afterwards (the transformers' Xavier on every matrix) then
    differs, the rest (biases) stays equal across the stack.

    Args:
        modules: modules of one architecture; each later module's parameters must be among the
            first's (a decoder layer may lack the first layer's optional projection).
    """
    if len(modules) == 0:  # an empty stack (e.g. no encoder layers)
        return
    first = dict(modules[0].named_parameters())
    for module in modules[1:]:
        for name, p in module.named_parameters():
            p.copy_(first[name])
