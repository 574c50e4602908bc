#!/usr/bin/env python
"""Plot the losses and AP of a Detectron2 training run from its ``metrics.json``.

    python tools/plot_metrics.py output/dn_dab_detr_R_18_shapes/metrics.json --output curve.png

Detectron2's ``JSONWriter`` appends one JSON object per line: the iteration and the scalars
logged since the previous line (training losses every 20 iterations, evaluation results such
as ``bbox/AP`` after each evaluation). A resumed run writes some iterations again; the last
value logged for an iteration wins. Only matplotlib is needed, not torch.
"""

import argparse
import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger("plot_metrics")

LOSSES = ("total_loss", "loss_ce", "loss_bbox", "loss_giou")
APS = ("bbox/AP", "bbox/AP50", "bbox/AP75")


def load_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.json``, one dict per line, sorted by iteration; a line
    that is not a JSON object (a run killed while writing) is skipped with a warning."""
    by_iter: Dict[int, Dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not JSON; skipped", path, number)
                continue
            if isinstance(record, dict) and "iteration" in record:
                # a resumed run logs an iteration again: keep the latest values
                by_iter.setdefault(int(record["iteration"]), {}).update(record)
    return [by_iter[i] for i in sorted(by_iter)]


def series(records: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    """``(iterations, values)`` of the records that logged ``key``."""
    points = [(r["iteration"], float(r[key])) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(records: Sequence[Dict], output: str, title: Optional[str] = None) -> None:
    """Losses on the left, AP on the right (when the run evaluated), saved to ``output``."""
    has_ap = any(key in r for r in records for key in APS)
    fig, axes = plt.subplots(1, 2 if has_ap else 1, figsize=(12 if has_ap else 6, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    for key in LOSSES:
        iters, values = series(records, key)
        if iters:
            ax.plot(iters, values, label=key, linewidth=2 if key == "total_loss" else 1,
                    marker="." if len(iters) < 20 else None)  # a short run: show its points
    ax.set(xlabel="iteration", ylabel="loss (weighted)", title="training losses")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_ap:
        ax = axes[0, 1]
        for key in APS:
            iters, values = series(records, key)
            if iters:
                ax.plot(iters, values, marker="o", label=key)
        ax.set(xlabel="iteration", ylabel="AP (%)", title="evaluation")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="a Detectron2 metrics.json")
    parser.add_argument("--output", default="metrics.png", help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title (default: the path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = load_metrics(args.metrics)
    if not records:
        raise SystemExit(f"{args.metrics} holds no metrics")
    plot_metrics(records, args.output, args.title or args.metrics)
    logger.info("training curve (losses and AP against iteration): %s", args.output)


if __name__ == "__main__":
    main()
