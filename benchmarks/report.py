"""Tables, ratios and goals of the benchmark's results (rows are flat dicts, see
``benchmark.py``)."""

from typing import Dict, List, Optional, Sequence, Tuple

# (header, row key or function of the row, format)
Column = Tuple[str, object, str]

COLUMNS: List[Column] = [
    ("impl", "impl", "{}"),
    ("variant", "variant", "{}"),
    ("dtype", "dtype", "{}"),
    ("HxW", lambda r: f"{r['height']}x{r['width']}", "{}"),
    ("B", "batch", "{}"),
    ("NQ", "num_queries", "{}"),
    ("median ms", lambda r: r["latency_ms"]["median"], "{:.1f}"),
    ("min ms", lambda r: r["latency_ms"]["min"], "{:.1f}"),
    ("max ms", lambda r: r["latency_ms"]["max"], "{:.1f}"),
    ("IQR ms", lambda r: r["latency_ms"]["q3"] - r["latency_ms"]["q1"], "{:.1f}"),
    ("n", lambda r: r["latency_ms"]["repeats"], "{}"),
    ("img/s", "images_per_s", "{:.2f}"),
    ("peak MiB", "peak_mib", "{:.0f}"),
]

# what pairs an "ours" row with its "transformers" row
_PAIR_KEYS = ("section", "variant", "dtype", "height", "width", "batch", "train")


def _cell(row: Dict, key: object, fmt: str) -> str:
    value = key(row) if callable(key) else row.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(title: str, rows: Sequence[Dict]) -> str:
    """A plain-text table of ``rows`` under ``title``."""
    if not rows:
        return f"{title}: (none)"
    header = [c[0] for c in COLUMNS]
    body = [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    errors = [f"  {r['impl']} {r['variant']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + errors)


def ratios(rows: Sequence[Dict]) -> List[Dict]:
    """For every case measured for both implementations: ours / transformers, of the median
    latency and of the peak memory."""
    theirs = {tuple(r[k] for k in _PAIR_KEYS): r for r in rows if r["impl"] == "transformers"}
    out = []
    for r in rows:
        ref = theirs.get(tuple(r[k] for k in _PAIR_KEYS))
        if r["impl"] != "ours" or ref is None:
            continue
        out.append({**{k: r[k] for k in _PAIR_KEYS},
                    "latency_ratio": _ratio(r["latency_ms"]["median"],
                                            ref["latency_ms"]["median"]),
                    "memory_ratio": _ratio(r.get("peak_mib"), ref.get("peak_mib"))})
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def format_ratios(rows: Sequence[Dict]) -> str:
    lines = ["ours / transformers (median latency, peak memory)"]
    for r in rows:
        what = "train step" if r["train"] else "inference"
        lat, mem = r["latency_ratio"], r["memory_ratio"]
        lines.append(f"  {r['section']:<10} {r['variant']:<8} {r['dtype']:<9} {what:<10} "
                     f"{r['height']}x{r['width']} B={r['batch']}: latency "
                     f"{'-' if lat is None else f'{lat:.3f}'}, memory "
                     f"{'-' if mem is None else f'{mem:.3f}'}")
    return "\n".join(lines)


# (name, section, variant, train, ratio key, target): "ours <= target x transformers"
GOALS = [
    ("CPU inference latency, R50, batch 1", "inference", "R50", False, "latency_ratio", 0.9),
    ("CPU inference latency, R50-DC5, batch 1", "inference", "R50-DC5", False,
     "latency_ratio", 0.7),
    ("peak memory of an R50-DC5 training step", "training", "R50-DC5", True, "memory_ratio",
     0.6),
]


def goals(ratio_rows: Sequence[Dict]) -> List[Dict]:
    """Each goal with the measured ratio (batch 1 for inference; the training batch)."""
    out = []
    for name, section, variant, train, key, target in GOALS:
        found = [r for r in ratio_rows if r["section"] == section and r["variant"] == variant
                 and r["train"] == train and r["dtype"] == "float32"
                 and (train or r["batch"] == 1)]
        value = found[0][key] if found else None
        out.append({"goal": f"{name}: ours <= {target} x transformers", "target": target,
                    "ratio": value, "met": value is not None and value <= target})
    return out


def format_goals(goal_rows: Sequence[Dict]) -> str:
    lines = ["goals"]
    for g in goal_rows:
        value = "not measured" if g["ratio"] is None else f"{g['ratio']:.3f}"
        lines.append(f"  {g['goal']}: {value} -> {'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)
