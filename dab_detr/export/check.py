"""Check an exported file: onnxruntime's detections against PyTorch's ``model.inference`` on
batches of image sizes other than the export's, padded.

Detections are compared in PyTorch's order up to ties: two scores closer than the tolerance may
come out of the two top-k in either order, and the last of the S may differ by one of equal
score.

Shapes: B batch, S detections per image.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

from .exporter import INPUT_NAMES, require
from .wrapper import ExportError

__all__ = ["CheckReport", "check_onnx", "match_detections", "pytorch_detections",
           "run_onnxruntime"]

logger = logging.getLogger(__name__)

Detections = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # scores, classes, boxes


@dataclass
class CheckReport:
    """The largest differences over every image checked, and how many detections were
    matched out of order (ties) or left unmatched at the end of the top-k (tied there)."""

    max_score_diff: float
    max_box_diff: float
    reordered: int
    cut_at_the_end: int


def run_onnxruntime(path: str, images: torch.Tensor, image_sizes: torch.Tensor,
                    threads: Optional[int] = None) -> Detections:
    """``path``'s outputs on ``images`` ``(B, 3, H, W)`` and ``image_sizes`` ``(B, 2)``, by
    onnxruntime's CPU provider (``threads`` intra-op threads; None: its default)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUT_NAMES, (images.cpu().numpy(), image_sizes.cpu().numpy())))
    return tuple(torch.from_numpy(x) for x in session.run(None, feed))


@torch.no_grad()
def pytorch_detections(model: nn.Module, images: ImageList) -> Detections:
    """``model.inference``'s detections of a batch, stacked: scores ``(B, S)``, classes
    ``(B, S)``, boxes ``(B, S, 4)`` XYXY in input pixels."""
    outputs = model.forward_predictions(images, with_aux=False)
    results = model.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
    return (torch.stack([r.scores for r in results]),
            torch.stack([r.pred_classes for r in results]),
            torch.stack([r.pred_boxes.tensor for r in results]))


def match_detections(expected: Detections, actual: Detections, score_tol: float) -> torch.Tensor:
    """For each of ``expected``'s detections, the index of the same detection in ``actual``:
    the unused one of the same class whose score is within ``score_tol`` and whose box is
    nearest (an exact match at the same index when there is no tie).

    Returns:
        ``(B, S)`` long; -1 for an expected detection that ``actual``'s top-k left out, which
        is a tie only when its score is within ``score_tol`` of ``actual``'s last.
    """
    scores, classes, boxes = expected
    a_scores, a_classes, a_boxes = actual
    index = torch.full(scores.shape, -1, dtype=torch.long)
    for b in range(scores.shape[0]):
        free = torch.ones(a_scores.shape[1], dtype=torch.bool)
        for i in range(scores.shape[1]):
            candidates = (free & (a_classes[b] == classes[b, i])
                          & ((a_scores[b] - scores[b, i]).abs() <= score_tol))
            if not candidates.any():
                continue
            distance = (a_boxes[b] - boxes[b, i]).abs().amax(-1).masked_fill(~candidates, 1e30)
            j = int(distance.argmin())
            index[b, i] = j
            free[j] = False
    return index


def compare(expected: Detections, actual: Detections, window: float) -> CheckReport:
    """The differences between detections matched within score ``window``
    (``match_detections``); an unmatched one that is no tie at the end counts as an infinite
    difference."""
    index = match_detections(expected, actual, window)
    matched = index >= 0
    gather = index.clamp(min=0)
    scores = actual[0].gather(1, gather)
    boxes = actual[2].gather(1, gather[..., None].expand(-1, -1, 4))
    score_diff = (scores - expected[0]).abs()[matched]
    box_diff = (boxes - expected[2]).abs().amax(-1)[matched]
    last = actual[0][:, -1:].expand_as(expected[0])
    cut = ~matched & ((expected[0] - last).abs() <= window)
    lost = ~matched & ~cut
    positions = torch.arange(index.shape[1]).expand_as(index)
    return CheckReport(
        max_score_diff=float("inf") if lost.any() else _max(score_diff),
        max_box_diff=float("inf") if lost.any() else _max(box_diff),
        reordered=int((matched & (index != positions)).sum()),
        cut_at_the_end=int(cut.sum()),
    )


def _max(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def check_onnx(
    path: str,
    model: nn.Module,
    batches: Sequence[Sequence[Tuple[int, int]]],
    score_tol: float = 1e-4,
    box_tol: float = 1e-3,
    seed: int = 0,
) -> CheckReport:
    """Run ``path`` and ``model`` on random images of the ``(h, w)`` sizes of each batch
    (normalised and padded by ``model.preprocess_image``).

    Returns:
        The worst differences over all batches.

    Raises:
        ExportError: a score differs by more than ``score_tol`` or a box coordinate by more
            than ``box_tol`` pixels, or a detection is missing.
    """
    generator = torch.Generator().manual_seed(seed)
    reports: List[CheckReport] = []
    for sizes in batches:
        inputs = [{"image": torch.rand(3, h, w, generator=generator) * 255} for h, w in sizes]
        images = model.preprocess_image(inputs)
        expected = pytorch_detections(model, images)
        actual = run_onnxruntime(path, images.tensor, torch.tensor(images.image_sizes))
        # matched within 10x the tolerance, so that the differences reported are the real
        # ones (a tolerance window would cap them at the tolerance)
        report = compare(expected, actual, 10 * score_tol)
        logger.info("batch %s padded to %s: max |score diff| %.3g, max |box diff| %.3g px "
                    "(%d detections reordered by ties, %d tied at the end)", list(sizes),
                    tuple(images.tensor.shape[-2:]), report.max_score_diff,
                    report.max_box_diff, report.reordered, report.cut_at_the_end)
        reports.append(report)
    worst = CheckReport(max(r.max_score_diff for r in reports),
                        max(r.max_box_diff for r in reports),
                        sum(r.reordered for r in reports), sum(r.cut_at_the_end for r in reports))
    if worst.max_score_diff > score_tol or worst.max_box_diff > box_tol:
        raise ExportError(
            f"{path}: onnxruntime's detections differ from PyTorch's: max score difference "
            f"{worst.max_score_diff:.3g} (tolerance {score_tol:g}), max box difference "
            f"{worst.max_box_diff:.3g} px (tolerance {box_tol:g}); inf: a detection is missing"
        )
    return worst
