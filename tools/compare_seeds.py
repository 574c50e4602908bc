#!/usr/bin/env python
"""Compare training variants over several seeds: AP against iteration (median and min-max band
of the seeds) and a table of min / median / max at every evaluation.

    python tools/compare_seeds.py --output output/dn_study/dn_vs_plain.png \\
        --variant "DAB-DETR=output/dn_study/seed*/full/metrics.json" \\
        --variant "DN-DAB-DETR=output/dn_study/seed*/dn_dab_detr/metrics.json"

Each ``--variant NAME=GLOB`` names the ``metrics.json`` of its seeds (for instance the runs of
``tools/convergence_study.py --seed S``). The table goes to stdout, as Markdown, and with
``--markdown FILE`` into that file too.
"""

import argparse
import glob
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from plot_metrics import load_metrics, series  # noqa: E402

METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75")
# variant -> metric -> iteration -> one value per seed
Curves = Dict[str, Dict[str, Dict[int, List[float]]]]


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"NAME=GLOB"`` -> ``(NAME, the sorted files GLOB matches)``; no file is an error."""
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=GLOB")
    files = sorted(glob.glob(pattern))
    if not files:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: {pattern} matches no file")
    return name, files


def collect(variants: Sequence[Tuple[str, List[str]]]) -> Curves:
    """Per variant and metric, the values of every seed at each evaluated iteration."""
    curves: Curves = {}
    for name, files in variants:
        per_metric: Dict[str, Dict[int, List[float]]] = {m: {} for m in METRICS}
        for path in files:
            records = load_metrics(path)
            for metric in METRICS:
                for it, value in zip(*series(records, metric)):
                    per_metric[metric].setdefault(it, []).append(value)
        curves[name] = per_metric
    return curves


def table(curves: Curves) -> str:
    """Markdown: one row per variant and evaluation, ``min / median / max`` of each metric
    over the seeds (the seed count in its own column)."""
    lines = ["| variant | iteration | seeds | " + " | ".join(
        f"{m.split('/')[1]} min / median / max" for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name, per_metric in curves.items():
        for it in sorted(per_metric[METRICS[0]]):
            cells = []
            for metric in METRICS:
                values = per_metric[metric].get(it, [])
                cells.append(f"{min(values):.1f} / {statistics.median(values):.1f} / "
                             f"{max(values):.1f}" if values else "-")
            seeds = len(per_metric[METRICS[0]][it])
            lines.append(f"| {name} | {it} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: Curves, output: str, title: str) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        for name, per_metric in curves.items():
            its = sorted(per_metric[metric])
            values = [per_metric[metric][i] for i in its]
            line, = ax.plot(its, [statistics.median(v) for v in values], marker="o",
                            label=f"{name} (median of {max(len(v) for v in values)})")
            ax.fill_between(its, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="NAME=GLOB of its seeds' metrics.json; repeat for each variant")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--title", default="AP over seeds: median, band from min to max")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    curves = collect(args.variant)
    plot(curves, args.output, args.title)
    text = table(curves)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
