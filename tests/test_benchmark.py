"""``benchmarks/benchmark.py --quick`` runs end to end (tiny inputs, one repeat) and writes
results of the documented structure: numbers, not their values, are checked here. It covers
DAB-DETR, DETR and Conditional DETR against transformers, and DAB-Deformable-DETR and DINO (ours
only, with the share of their time in deformable attention)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("matplotlib")

SECTIONS = ("inference", "training", "scaling_size", "scaling_queries")
ROW_KEYS = {"section", "impl", "model", "variant", "train", "device", "dtype", "height",
            "width", "short_side", "batch", "num_queries", "latency_ms", "images_per_s",
            "peak_mib", "baseline_mib", "error", "date"}
LATENCY_KEYS = {"median", "min", "max", "q1", "q3", "repeats"}
# (impl, variant) of the inference and training sections
PAIRED = {(i, v) for i in ("ours", "transformers")
          for v in ("R50", "R50-DC5", "DETR-R50", "Conditional-R50")}
# the variants without a transformers counterpart (ours only), and their model families
OURS_ONLY = {"Deformable-R50": "dab_deformable_detr", "DINO-R50": "dino"}
MEASURED = PAIRED | {("ours", v) for v in OURS_ONLY}
NO_COUNTERPART = "- (no transformers counterpart)"
# a printed attention share: "MSDeformAttn 37.8% (247 + 0 ms, 12 calls)"
SHARE_LINE = re.compile(r"(?:Deformable|DINO)-R50 (?:inference|train step) \d+x\d+ B=\d: (\d+) "
                        r"ms CPU \(\d+ "
                        r"ms wall\): MSDeformAttn (\d+\.\d)% \((\d+) \+ (\d+) ms, 12 calls\); "
                        r"multi_scale_deformable_attention (\d+\.\d)% ")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "benchmark.py"), "--quick",
         "--threads", "1", "--output", str(out / "results.json"), "--plot",
         str(out / "scaling.png")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return json.load(f), proc.stdout, out / "scaling.png"


def _check_row(row):
    assert set(row) == ROW_KEYS, row
    assert row["error"] is None, row
    assert set(row["latency_ms"]) == LATENCY_KEYS
    lat = row["latency_ms"]
    assert lat["repeats"] == 1
    assert 0 < lat["min"] <= lat["q1"] <= lat["median"] <= lat["q3"] <= lat["max"]
    assert row["images_per_s"] > 0
    assert row["peak_mib"] > 0 and row["baseline_mib"] > 0


def test_quick_benchmark_rows(quick_results):
    results, _, _ = quick_results
    assert set(results) == {"meta", *SECTIONS, "attention_share", "cuda", "ratios", "goals"}
    assert results["meta"]["quick"] is True
    for section in SECTIONS:
        for row in results[section]:
            _check_row(row)
    # both implementations of DAB-DETR, DETR and Conditional DETR, ours of DAB-Deformable-DETR,
    # the batches of the settings at inference
    batches = results["meta"]["settings"]["batches"]
    cases = {(r["impl"], r["variant"], r["batch"]) for r in results["inference"]}
    assert cases == {(i, v, b) for i, v in MEASURED for b in batches}
    assert {(r["impl"], r["variant"]) for r in results["training"]} == MEASURED
    for variant, model in OURS_ONLY.items():
        assert {r["model"] for r in results["inference"] + results["training"]
                if r["variant"] == variant} == {model}
    # DINO-4scale's 900 queries are selected from the encoder's proposals
    assert {r["num_queries"] for r in results["inference"] if r["variant"] == "DINO-R50"} == {
        900}
    assert all(r["train"] for r in results["training"])
    assert len({r["short_side"] for r in results["scaling_size"]}) >= 2
    assert {r["impl"] for r in results["scaling_queries"]} == {"ours"}
    assert len({r["num_queries"] for r in results["scaling_queries"]}) >= 2


def test_quick_benchmark_ratios_goals_and_plot(quick_results):
    results, stdout, plot = quick_results
    # a ratio for every case measured for both: inference, training, the scaling sizes
    rows = results["inference"] + results["training"] + results["scaling_size"]
    pairs = sum(r["impl"] == "transformers" for r in rows)
    ours_only = [r for r in rows if r["variant"] in OURS_ONLY]
    assert {r["variant"] for r in ours_only} == set(OURS_ONLY)
    assert len(rows) == 2 * pairs + len(ours_only)
    assert len(results["ratios"]) == pairs
    assert not set(OURS_ONLY) & {r["variant"] for r in results["ratios"]}
    for r in results["ratios"]:
        assert r["latency_ratio"] > 0 and r["memory_ratio"] > 0
    assert len(results["goals"]) == 3
    for g in results["goals"]:
        assert g["ratio"] > 0 and g["met"] == (g["ratio"] <= g["target"])
    cuda = results["cuda"]
    assert "skipped" in cuda or all(r["error"] is None for r in cuda["inference"])
    assert "median ms" in stdout and "peak MiB" in stdout and "goals" in stdout
    # the README lines: DAB-Deformable-DETR's and DINO's figures, "-" for transformers and
    # the ratio
    for section, what in (("inference", "inference"), ("training", "training step")):
        for r in results[section]:
            if r["variant"] in OURS_ONLY:
                line = (f"| {what} {r['variant']}, {r['height']}x{r['width']}, batch "
                        f"{r['batch']} | {r['latency_ms']['median']:.0f} ms, "
                        f"{r['peak_mib']:.0f} MiB | {NO_COUNTERPART} | - |")
                assert line in stdout, stdout
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_benchmark_attention_share(quick_results):
    """Every DAB-Deformable-DETR and DINO case gets the share of its time in the MSDeformAttn
    modules and in the function, in (0, 1), the function's inside the modules'; saved and
    printed."""
    results, stdout, _ = quick_results
    settings = results["meta"]["settings"]
    rows = results["attention_share"]
    assert {(r["variant"], r["train"], r["batch"]) for r in rows} == {
        (v, train, b) for v in OURS_ONLY
        for train, b in [*((False, b) for b in settings["batches"]),
                         (True, settings["train_batch"])]}
    for r in rows:
        assert r["error"] is None, r
        assert r["step_ms"] > 0 and r["step_cpu_ms"] > 0
        module, function = r["module"], r["function"]
        assert (module["label"], function["label"]) == ("MSDeformAttn",
                                                        "multi_scale_deformable_attention")
        for part in (module, function):
            assert part["calls"] == 12  # 6 encoder and 6 decoder layers (both models)
            assert part["forward_ms"] > 0 and 0 < part["share"] < 1
            # backward only in training: the nodes made inside the ranges were found
            assert (part["backward_ms"] > 0) == r["train"]
        assert function["forward_ms"] < module["forward_ms"]
        assert function["backward_ms"] <= module["backward_ms"]
        assert function["share"] < module["share"]
    printed = SHARE_LINE.findall(stdout)
    # each case printed twice: as it is measured and in the final summary
    assert len(printed) == 2 * len(rows), stdout
    for step_ms, module_pct, forward, _, function_pct in printed:
        assert int(step_ms) > 0 and int(forward) > 0
        assert 0 < float(function_pct) < float(module_pct) < 100
    assert "method: timing hooks" in stdout
    assert "attention_share_method" in results["meta"]


def _row(variant, impl="ours", batch=1, median=1.0):
    return {"section": "inference", "impl": impl, "variant": variant, "train": False,
            "device": "cpu", "dtype": "float32", "height": 8, "width": 8, "batch": batch,
            "num_queries": 300, "latency_ms": {"median": median}}


def test_merge_keeps_the_cases_not_measured():
    """``--merge``: a later run's rows replace the earlier run's of the same case; the other
    earlier rows stay, with their run's date; ratios pair rows of one run."""
    from benchmarks import report
    from benchmarks.results import ROW_SECTIONS, merge_earlier

    earlier = {"meta": {"date": "2026-11-22T06:35:36"}, "cuda": {"skipped": "no CUDA"},
               **{k: [] for k in ROW_SECTIONS}}
    earlier["inference"] = [_row("R50"), _row("R50", "transformers"), _row("R50-DC5"),
                            _row("R50-DC5", "transformers")]
    new = {"meta": {"date": "2026-12-01T21:00:00"}, "cuda": {"not_selected": "-"},
           **{k: [] for k in ROW_SECTIONS}}
    new["inference"] = [{**_row(v, i, median=2.0), "date": "2026-12-01T21:00:00"}
                        for v, i in (("R50", "ours"), ("R50", "transformers"),
                                     ("Deformable-R50", "ours"))]
    assert merge_earlier(new, earlier) == 3  # the two R50-DC5 rows and the CUDA section
    rows = new["inference"]
    assert [(r["variant"], r["impl"]) for r in rows] == [
        ("R50", "ours"), ("R50", "transformers"), ("R50-DC5", "ours"),
        ("R50-DC5", "transformers"), ("Deformable-R50", "ours")]
    assert [r["latency_ms"]["median"] for r in rows] == [2.0, 2.0, 1.0, 1.0, 2.0]
    assert [r["date"][:10] for r in rows] == ["2026-12-01", "2026-12-01", "2026-11-22",
                                              "2026-11-22", "2026-12-01"]
    assert rows[2]["model"] == "dab_detr"
    assert new["cuda"] == {"skipped": "no CUDA"}
    assert new["meta"]["earlier_runs"] == [{"date": "2026-11-22T06:35:36"}]
    # the README lines (one per case: R50, R50-DC5, Deformable-R50) name the day of a row
    # from another run
    lines = report.format_markdown(rows, new["meta"]["date"]).splitlines()[2:]
    assert ["(run of 2026-11-22)" in line for line in lines] == [False, True, False]


def test_memory_stability_runs(tmp_path):
    """``benchmarks/memory_stability.py`` on a few iterations of a small model: it samples the
    RSS and reports the growth (numbers, not their values, are checked)."""
    from test_train_net import SMALL

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DAB_DETR_DATASETS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "memory_stability.py"), "--iters", "4",
         "--every", "2", "--warmup", "1", "--num-images", "8", *SMALL],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"start: rss \d+\.\d MiB, 4 iterations", proc.stdout), proc.stdout
    assert re.search(r"RSS growth from iteration \d+ to \d+: [+-]\d+\.\d MiB .* peak \d+\.\d MiB",
                     proc.stdout), proc.stdout
