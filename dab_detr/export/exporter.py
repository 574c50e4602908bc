"""Write an ``ExportableDetector`` to an ONNX file whose batch size and image height and width
are dynamic.

The graph is captured by ``torch.export`` (``torch.onnx.export(dynamo=True)``), not by the
TorchScript tracer: the tracer records every size computed in Python (the levels' shapes, the
token counts, ``arange`` lengths) as the constant it had on the example, so a graph traced at
one image size silently computes garbage at another. ``torch.export`` keeps them symbolic and
refuses, with an error, any code that would fix a dimension declared dynamic; an export that
succeeds is dynamic in B, H and W. But ``torch.onnx.export`` retries a refused capture with the
fixes that torch.export suggests (a minimum size: the multi-scale models' smallest map has more
than one row and column on the example, ``Dim("height", min=65)``; or a constant), and then
with Dynamo's strict capture: ``_check_dynamic`` refuses a file in which B, H or W came out
constant.

Shapes: B batch, H x W the padded batch, S detections per image.
"""

import importlib
import logging
import os
import traceback
import warnings
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from torch import nn

from .wrapper import EXPORTABLE, ExportableDetector, ExportError

__all__ = ["INPUT_NAMES", "OPSET", "OUTPUT_NAMES", "check_exportable", "export_onnx", "require"]

logger = logging.getLogger(__name__)

# Opset 20: the default of torch.onnx's exporter (its operator library writes this opset, no
# version conversion), and GridSample's latest version (20: "linear" mode, N-d). Deformable
# attention needs GridSample, bilinear with zero padding on 4-d maps: opset 16 has it, so any
# runtime of opset >= 16 could run an opset-16 graph, but the exporter's conversion down to it
# is a further step that can fail; onnxruntime runs opset 20 since version 1.17.
OPSET = 20
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("scores", "classes", "boxes")


def require(module: str) -> ModuleType:
    """Import ``module`` (onnx, onnxscript, onnxruntime), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the ONNX export needs {module}, which is not installed: "
            "pip install onnx onnxscript onnxruntime (or pip install -e '.[export]')"
        ) from e


def check_exportable(cfg: CfgNode) -> None:
    """Refuse, naming the key, a config whose model the export does not handle."""
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta not in EXPORTABLE:
        raise ExportError(f"MODEL.META_ARCHITECTURE={meta!r}: the ONNX export supports "
                          f"{sorted(EXPORTABLE)}")


def export_onnx(
    model: nn.Module,
    path: str,
    example_size: Tuple[int, int],
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Export ``model``'s inference to ``path``.

    Inputs ``images`` ``(B, 3, H, W)`` float32 and ``image_sizes`` ``(B, 2)`` int64, outputs
    ``scores`` ``(B, S)``, ``classes`` ``(B, S)`` int64 and ``boxes`` ``(B, S, 4)``: see
    ``ExportableDetector.forward``.

    Args:
        model: a model of ``EXPORTABLE`` (DAB-DETR, DAB-Deformable-DETR, DETR, Conditional
            DETR, DINO) on the CPU.
        path: the ``.onnx`` file to write (weights inside it up to ONNX's 2 GB limit).
        example_size: ``(H, W)`` of the example batch the graph is captured on; any size
            runs afterwards.
        metadata: strings stored in the file's ``metadata_props``.

    Raises:
        ExportError: ``model`` is not exportable, or ``torch.export`` could not capture it
            (the message names the failing operation).
    """
    require("onnx")
    require("onnxscript")
    from torch.export import Dim

    wrapper = ExportableDetector(model)
    h, w = example_size
    # two images, the second smaller: the example exercises batching and the padding mask
    images = torch.zeros(2, 3, h, w, device=model.device)
    sizes = torch.tensor([[h, w], [max(h * 3 // 4, 1), max(w * 3 // 4, 1)]], device=model.device)
    batch = Dim("batch")
    dynamic = {"images": {0: batch, 2: Dim("height"), 3: Dim("width")},
               "image_sizes": {0: batch}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the two inputs' shared Dim: named once, which the exporter reports as a warning
            warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used")
            program = torch.onnx.export(
                wrapper, (images, sizes), dynamo=True, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic, verbose=False,
            )
    except Exception as e:  # torch.export's errors: a class per cause, and long
        raise ExportError(
            f"torch.export could not capture {type(model).__name__}{_where(e)}: "
            f"{_first_line(e)}"
        ) from e
    _check_dynamic(program.model, type(model).__name__, (images, sizes))
    _register_orphaned_constants(program.model)
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    program.save(path)
    try:
        require("onnx").checker.check_model(path)
    except Exception as e:
        raise ExportError(f"{path}: the ONNX file written is invalid: {_first_line(e)}") from e
    logger.info("wrote %s (opset %d; batch, height and width dynamic)", path, OPSET)


def _check_dynamic(model, name: str, example: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Refuse a graph whose batch size, height or width is a constant (the example's).

    Args:
        model: the exported ``onnx_ir.Model``.
        name: the model's class name, for the message.
        example: the example inputs, whose sizes a constant dimension took.

    Raises:
        ExportError: naming the dimensions made constant.
    """
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
    fixed = {}
    for value, tensor in zip(model.graph.inputs, example):
        for axis, dim_name in dynamic[value.name].items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, int):
                fixed[dim_name] = tensor.shape[axis]
    if fixed:
        raise ExportError(
            f"the ONNX graph of {name} has a constant "
            + ", ".join(f"{k} ({v}, the example's)" for k, v in fixed.items())
            + ": the model's code fixed a dimension declared dynamic (a Python int taken of "
            "a tensor's size, such as len(tensor)); TORCH_LOGS=+dynamic shows the guard "
            "'Eq(s.., N)' and its line"
        )


def _register_orphaned_constants(model) -> None:
    """Make the constants that a node reads but the graph lost initializers again.

    onnxscript's rewriter (``RewriteRuleSet._apply_to_graph_or_function``, 0.7) files the
    initializers a rewrite makes by name, replacing one of the same name; ``FuseSuccessiveClip``
    names the bounds of its Clip after its input (``sigmoid_min``, ``sigmoid_max``), so two
    ``Clip(Clip(x))`` fused on one tensor (DINO's decoder takes ``inverse_sigmoid`` of its
    first anchors twice) leave the first Clip reading bounds that no list of the graph holds,
    a file that onnxruntime refuses ("Node input 'sigmoid_min_1' is not a graph input,
    initializer, or output of a previous node"). The bounds are still attached to their values:
    registering them restores the graph that was meant.

    Args:
        model: the exported ``onnx_ir.Model``, changed in place.
    """
    graph = model.graph
    for node in graph:
        for value in node.inputs:
            if (value is not None and value.producer() is None and value.const_value is not None
                    and not value.is_graph_input() and not value.is_initializer()):
                graph.register_initializer(value)


def _causes(error: BaseException) -> List[BaseException]:
    """``error`` and the exceptions it was raised from, the innermost last."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def _first_line(error: BaseException) -> str:
    """The innermost cause's first non-empty line, which says what failed."""
    inner = _causes(error)[-1]
    lines = [line for line in str(inner).splitlines() if line.strip()]
    first = f"{type(inner).__name__}: {lines[0] if lines else ''}"
    # a dimension declared dynamic that the code fixed: which one, and to what
    fixed = list(dict.fromkeys(line.strip(" -") for line in lines
                               if "your code specialized it to be a constant" in line))
    return " ".join([first, *(line.split(". If you")[0] for line in fixed)])


def _where(error: BaseException) -> str:
    """`` in <file>:<line> (<function>)``: the model code that failed, the last frame of this
    package (but of the export itself) in the tracebacks (torch.export runs the model's
    Python, so its frames are there); empty when there is none."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    export = os.path.dirname(os.path.abspath(__file__))
    where = ""
    for cause in _causes(error):
        for frame, line in traceback.walk_tb(cause.__traceback__):
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(package + os.sep) and not path.startswith(export + os.sep):
                rel = os.path.relpath(path, os.path.dirname(package))
                where = f" in {rel}:{line} ({frame.f_code.co_name})"
    return where
