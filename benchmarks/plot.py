"""The scaling plot: latency and peak memory against the input's short side (both
implementations) and against the number of queries (ours)."""

from typing import Dict, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"ours": dict(color="tab:blue", marker="o"),
          "transformers": dict(color="tab:orange", marker="s")}


def _series(ax, rows: Sequence[Dict], x_key: str, y, ylabel: str) -> None:
    top = 0.0
    for impl in ("ours", "transformers"):
        points = sorted((r[x_key], y(r)) for r in rows
                        if r["impl"] == impl and y(r) is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=impl, **_STYLE[impl])
            top = max(top, *ys)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.15 or 1)  # from zero: a flat curve looks flat
    ax.grid(alpha=0.3)
    ax.legend()


def plot_scaling(by_size: Sequence[Dict], by_queries: Sequence[Dict], path: str,
                 title: str) -> None:
    """Write a 2 x 2 figure: latency and memory against the short side (top) and against
    the number of queries (bottom)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    median = lambda r: r["latency_ms"]["median"]  # noqa: E731
    memory = lambda r: r.get("peak_mib")  # noqa: E731
    _series(axes[0, 0], by_size, "short_side", median, "median latency (ms)")
    _series(axes[0, 1], by_size, "short_side", memory, "peak memory (MiB)")
    _series(axes[1, 0], by_queries, "num_queries", median, "median latency (ms)")
    _series(axes[1, 1], by_queries, "num_queries", memory, "peak memory (MiB)")
    for ax in axes[0]:
        ax.set_xlabel("short side (px), batch 1, R50")
    for ax in axes[1]:
        ax.set_xlabel("queries (ours, R50, batch 1)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
