"""The share of a step's time spent in multi-scale deformable attention (CPU; the
DAB-Deformable-DETR and DINO cases), by timing hooks.

Two labels are measured: the function ``multi_scale_deformable_attention`` (the sampling and
weighting) and the whole ``MSDeformAttn`` modules (the function plus the value, offset, weight
and output projections and the softmax). ``METHOD`` says how; it is printed with the figures.
"""

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dab_detr.layers import ms_deform_attn

FUNCTION = "multi_scale_deformable_attention"
MODULE = "MSDeformAttn"

METHOD = (
    "timing hooks, CPU time of the process (time.process_time: what this process computed, "
    "whatever else the machine runs), on steps run after warm-up. Forward hooks on every "
    "MSDeformAttn module, and a wrapper of multi_scale_deformable_attention (patched in "
    "dab_detr.layers.ms_deform_attn, where MSDeformAttn.forward looks it up, for the measured "
    "steps only), time each call. Backward (training): the autograd nodes a call made are "
    "those reachable from its output whose sequence numbers lie between two probe nodes made "
    "as the call starts and ends; a pre-hook and a hook on each time its backward. Share: "
    "(forward + backward) / CPU time of the whole step; not counted: the engine's work between "
    "nodes and the gradient accumulation of the modules' parameters."
)


def _probe() -> Optional[int]:
    """The sequence number of a fresh autograd node: nodes made later have larger ones. None
    when gradients are off (no nodes, no backward)."""
    if not torch.is_grad_enabled():
        return None
    return torch.zeros((), requires_grad=True).mul(1.0).grad_fn._sequence_nr()


class _Label:
    """CPU seconds of the calls of one label: forward, and backward of the nodes they made."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._open: List[Tuple[Optional[int], float]] = []

    def enter(self) -> None:
        self._open.append((_probe(), time.process_time()))

    def exit(self, output: torch.Tensor) -> None:
        after, start = self._open.pop()
        self.forward_s += time.process_time() - start
        self.calls += 1
        if after is not None and output.grad_fn is not None:
            for node in _made_between(output.grad_fn, after, _probe()):
                self._time(node)

    def _time(self, node: torch.autograd.graph.Node) -> None:
        starts: List[float] = []

        def before(grad_outputs):
            starts.append(time.process_time())

        def done(grad_inputs, grad_outputs):
            self.backward_s += time.process_time() - starts.pop()

        node.register_prehook(before)
        node.register_hook(done)


def _made_between(root: torch.autograd.graph.Node, after: int, before: int
                  ) -> List[torch.autograd.graph.Node]:
    """The nodes of ``root``'s graph numbered in (after, before): those made in between.
    Older nodes (and all below them, older still) end the walk; ``AccumulateGrad`` nodes,
    numbered above any, are left out."""
    found, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or not after < node._sequence_nr() < before:
            continue
        seen.add(id(node))
        found.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return found


@contextlib.contextmanager
def _labelled(model: nn.Module) -> Iterator[Tuple[_Label, _Label]]:
    """Time the ``MSDeformAttn`` modules of ``model`` and the function while inside."""
    module, function = _Label(MODULE), _Label(FUNCTION)
    attention = [m for m in model.modules() if isinstance(m, ms_deform_attn.MSDeformAttn)]
    if not attention:
        raise ValueError(f"{type(model).__name__} has no MSDeformAttn module")
    original = ms_deform_attn.multi_scale_deformable_attention

    def timed(*args: torch.Tensor) -> torch.Tensor:
        function.enter()
        output = original(*args)
        function.exit(output)
        return output

    handles = [h for m in attention for h in (
        m.register_forward_pre_hook(lambda *_: module.enter()),
        m.register_forward_hook(lambda _m, _args, output: module.exit(output)))]
    ms_deform_attn.multi_scale_deformable_attention = timed
    try:
        yield module, function
    finally:
        ms_deform_attn.multi_scale_deformable_attention = original
        for h in handles:
            h.remove()


def attention_share(model: nn.Module, step: Callable[[], None], warmup: int,
                    repeats: int) -> Dict:
    """Time ``repeats`` calls of ``step`` (one step of ``model``) after ``warmup`` others.

    Returns:
        ``step_ms`` (wall time per step), ``step_cpu_ms`` (CPU time per step), and for
        ``module`` and ``function``: the label, ``calls`` per step, ``forward_ms`` and
        ``backward_ms`` (CPU time per step), and ``share`` (of ``step_cpu_ms``, in [0, 1]).
    """
    for _ in range(warmup):
        step()
    with _labelled(model) as labels:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out: Dict = {"measured_steps": repeats, "step_ms": wall * 1000 / repeats,
                 "step_cpu_ms": cpu * 1000 / repeats}
    for key, label in zip(("module", "function"), labels):
        out[key] = {"label": label.name, "calls": label.calls / repeats,
                    "forward_ms": label.forward_s * 1000 / repeats,
                    "backward_ms": label.backward_s * 1000 / repeats,
                    "share": (label.forward_s + label.backward_s) / cpu}
    return out
