"""Tables, ratios and goals of the benchmark's results (rows are flat dicts, see
``benchmark.py``). A case that transformers has no counterpart of (DAB-Deformable-DETR, DINO)
has an "ours" row only: "-" where a comparison would be."""

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
# the last column: ours / transformers of the case, "-" if transformers has no counterpart
RATIO_HEADER = "ours/transformers (latency, memory)"

# what pairs an "ours" row with its "transformers" row
_PAIR_KEYS = ("section", "variant", "dtype", "height", "width", "batch", "train")


def _cell(row: Dict, key: object, fmt: str) -> str:
    value = key(row) if callable(key) else row.get(key)
    return "-" if value is None else fmt.format(value)


def _pair_key(row: Dict) -> tuple:
    return tuple(row[k] for k in _PAIR_KEYS)


def _fmt(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio_cell(row: Dict, theirs: Dict[tuple, Dict]) -> str:
    if row["impl"] != "ours":
        return ""
    ref = theirs.get(_pair_key(row))
    if ref is None:
        return "- (no transformers counterpart)"
    return (f"{_fmt(_ratio(row['latency_ms']['median'], ref['latency_ms']['median']))}, "
            f"{_fmt(_ratio(row.get('peak_mib'), ref.get('peak_mib')))}")


def format_table(title: str, rows: Sequence[Dict]) -> str:
    """A plain-text table of ``rows`` under ``title``."""
    if not rows:
        return f"{title}: (none)"
    theirs = {_pair_key(r): r for r in rows if r["impl"] == "transformers"}
    header = [c[0] for c in COLUMNS] + [RATIO_HEADER]
    body = [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] + [_ratio_cell(r, theirs)]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    errors = [f"  {r['impl']} {r['variant']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + errors)


def ratios(rows: Sequence[Dict]) -> List[Dict]:
    """For every case measured for both implementations: ours / transformers, of the median
    latency and of the peak memory."""
    theirs = {_pair_key(r): r for r in rows if r["impl"] == "transformers"}
    out = []
    for r in rows:
        ref = theirs.get(_pair_key(r))
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


def _summary(row: Optional[Dict]) -> str:
    """``"3059 ms, 219 MiB"`` of a row."""
    if row is None:
        return "- (no transformers counterpart)"
    median, peak = row["latency_ms"]["median"], row.get("peak_mib")
    return f"{_fmt(median, '{:.0f}')} ms, {_fmt(peak, '{:.0f}')} MiB"


def format_markdown(rows: Sequence[Dict], date: str) -> str:
    """The README's table: one line per case of ``rows`` (ours, transformers, ratios); a row
    measured on another day than ``date`` (merged from an earlier run) says its own."""
    theirs = {_pair_key(r): r for r in rows if r["impl"] == "transformers"}
    lines = ["| case | this project | transformers | ratio |", "|---|---|---|---|"]
    for r in rows:
        if r["impl"] != "ours":
            continue
        ref = theirs.get(_pair_key(r))
        what = "training step" if r["train"] else "inference"
        dtype = "" if r["dtype"] == "float32" else f" {r['dtype']}"
        ratio = "-" if ref is None else _ratio_cell(r, theirs)
        day = r.get("date", date)[:10]
        run = "" if day == date[:10] else f" (run of {day})"
        lines.append(f"| {what} {r['variant']}{dtype}, {r['height']}x{r['width']}, batch "
                     f"{r['batch']}{run} | {_summary(r)} | {_summary(ref)} | {ratio} |")
    return "\n".join(lines)


def format_shares(rows: Sequence[Dict], method: str) -> str:
    """The attention shares (``attention_share.attention_share`` rows), then ``method``."""
    lines = ["share of the step's CPU time in deformable attention (forward + backward)"]
    for r in rows:
        what = "train step" if r["train"] else "inference"
        if r.get("error"):
            lines.append(f"  {r['variant']} {what}: {r['error']}")
            continue
        parts = [f"{p['label']} {p['share']:.1%} ({p['forward_ms']:.0f} + "
                 f"{p['backward_ms']:.0f} ms, {p['calls']:.0f} calls)"
                 for p in (r["module"], r["function"])]
        lines.append(f"  {r['variant']} {what} {r['height']}x{r['width']} B={r['batch']}: "
                     f"{r['step_cpu_ms']:.0f} ms CPU ({r['step_ms']:.0f} ms wall): "
                     + "; ".join(parts))
    return "\n".join(lines + [f"method: {method}"])


def format_shares_markdown(rows: Sequence[Dict]) -> str:
    """README lines of the attention shares."""
    lines = ["| case | MSDeformAttn modules | multi_scale_deformable_attention |",
             "|---|---|---|"]
    for r in rows:
        if r.get("error"):
            continue
        what = "training step" if r["train"] else "inference"
        lines.append(f"| {what} {r['variant']}, {r['height']}x{r['width']}, batch {r['batch']}"
                     f" | {r['module']['share']:.0%} | {r['function']['share']:.0%} |")
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
        if g["ratio"] is None:  # e.g. its variant not selected
            lines.append(f"  {g['goal']}: not measured")
        else:
            lines.append(f"  {g['goal']}: {g['ratio']:.3f} -> {'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)
