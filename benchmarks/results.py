"""The benchmark's results file: a run's rows merged with an earlier run's (``--merge``), and
the output (tables on stdout, the JSON file, the scaling plot)."""

import json
import os
from typing import Dict, Optional

from benchmarks import report
from benchmarks.attention_share import METHOD
from benchmarks.cases import VARIANTS

# the sections of rows (flat dicts, see ``benchmark.py``) on CPU
ROW_SECTIONS = ("inference", "training", "scaling_size", "scaling_queries", "attention_share")
# what identifies a measured case: a later run's row replaces an earlier run's of equal key
_KEY = ("section", "impl", "variant", "train", "device", "dtype", "height", "width", "batch",
        "num_queries")
_SHARE_KEY = ("variant", "train", "height", "width", "batch")


def _key(section: str, row: Dict) -> tuple:
    return tuple(row.get(k) for k in (_SHARE_KEY if section == "attention_share" else _KEY))


def merge_earlier(results: Dict, earlier: Dict) -> int:
    """Add to ``results`` (this run) the rows of ``earlier`` (an earlier results file) of the
    cases this run did not measure, in place: a run of some ``--models`` / ``--variants`` /
    ``--sections`` then leaves the other figures in the file. Each row keeps the ``date`` of
    its run, and ``meta.earlier_runs`` the earlier runs' ``meta``; earlier rows keep their
    place, new cases come after them.

    Returns:
        the number of rows kept from ``earlier``.
    """
    date = earlier["meta"]["date"]
    kept = 0
    for section in ROW_SECTIONS:
        new = {_key(section, r): r for r in results[section]}
        merged = []
        for row in earlier.get(section, []):
            if _key(section, row) in new:
                merged.append(new.pop(_key(section, row)))
            else:
                # rows of files written before DAB-Deformable-DETR had neither field
                model = VARIANTS[row["variant"]].model if row["variant"] in VARIANTS else None
                merged.append({"model": model, "date": date, **row})
                kept += 1
        results[section] = merged + list(new.values())
    if "not_selected" in results["cuda"] and "cuda" in earlier:
        results["cuda"] = earlier["cuda"]
        kept += 1
    if kept:
        runs = earlier["meta"].pop("earlier_runs", [])
        results["meta"]["earlier_runs"] = runs + [earlier["meta"]]
    return kept


def load(path: str) -> Optional[Dict]:
    """The results file at ``path``, or None if there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write(results: Dict, output: str, plot: Optional[str], plot_title: str) -> None:
    """Print the tables, write ``output`` (JSON) and ``plot`` (None: no plot)."""
    tables = [("inference (CPU)", results["inference"]), ("training step (CPU)",
              results["training"]), ("scaling: short side (CPU)", results["scaling_size"]),
              ("scaling: queries (CPU)", results["scaling_queries"])]
    cuda = results["cuda"]
    if "skipped" in cuda or "not_selected" in cuda:
        tables.append((f"CUDA: skipped ({cuda.get('skipped') or cuda['not_selected']})", []))
    else:
        tables += [(f"inference ({cuda['device_name']})", cuda["inference"]),
                   (f"training step ({cuda['device_name']})", cuda["training"])]
    print()
    for title, rows in tables:
        print(report.format_table(title, rows) if rows else title, end="\n\n")
    print(report.format_ratios(results["ratios"]), end="\n\n")
    print(report.format_goals(results["goals"]), end="\n\n")
    if results["attention_share"]:
        print(report.format_shares(results["attention_share"], METHOD), end="\n\n")
    meta = results["meta"]
    print(f"README rows (CPU {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, "
          f"transformers {meta['transformers']}, float32, {meta['date'][:10]}):")
    print(report.format_markdown(results["inference"] + results["training"], meta["date"]))
    if results["attention_share"]:
        print()
        print(report.format_shares_markdown(results["attention_share"]))
    for path in (output, plot or output):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=1)
    if plot is None:
        print(f"\nwrote {output} (no scaling section run: no plot)")
        return
    # imported here: the memory-measuring processes re-import benchmark.py, hence this module,
    # and need no plot
    from benchmarks.plot import plot_scaling

    plot_scaling(results["scaling_size"], results["scaling_queries"], plot, plot_title)
    print(f"\nwrote {output} and {plot}")
