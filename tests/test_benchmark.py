"""``benchmarks/benchmark.py --quick`` runs end to end (tiny inputs, one repeat) and writes
results of the documented structure: numbers, not their values, are checked here."""

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
ROW_KEYS = {"section", "impl", "variant", "train", "device", "dtype", "height", "width",
            "short_side", "batch", "num_queries", "latency_ms", "images_per_s", "peak_mib",
            "baseline_mib", "error"}
LATENCY_KEYS = {"median", "min", "max", "q1", "q3", "repeats"}


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
    assert set(results) == {"meta", *SECTIONS, "cuda", "ratios", "goals"}
    assert results["meta"]["quick"] is True
    for section in SECTIONS:
        for row in results[section]:
            _check_row(row)
    # both implementations, both variants, the batches of the settings at inference
    batches = results["meta"]["settings"]["batches"]
    cases = {(r["impl"], r["variant"], r["batch"]) for r in results["inference"]}
    assert cases == {(i, v, b) for i in ("ours", "transformers") for v in ("R50", "R50-DC5")
                     for b in batches}
    assert {(r["impl"], r["variant"]) for r in results["training"]} == {
        (i, v) for i in ("ours", "transformers") for v in ("R50", "R50-DC5")}
    assert all(r["train"] for r in results["training"])
    assert len({r["short_side"] for r in results["scaling_size"]}) >= 2
    assert {r["impl"] for r in results["scaling_queries"]} == {"ours"}
    assert len({r["num_queries"] for r in results["scaling_queries"]}) >= 2


def test_quick_benchmark_ratios_goals_and_plot(quick_results):
    results, stdout, plot = quick_results
    # a ratio for every case measured for both: inference, training, the scaling sizes
    pairs = (len(results["inference"]) + len(results["training"])
             + len(results["scaling_size"])) // 2
    assert len(results["ratios"]) == pairs
    for r in results["ratios"]:
        assert r["latency_ratio"] > 0 and r["memory_ratio"] > 0
    assert len(results["goals"]) == 3
    for g in results["goals"]:
        assert g["ratio"] > 0 and g["met"] == (g["ratio"] <= g["target"])
    cuda = results["cuda"]
    assert "skipped" in cuda or all(r["error"] is None for r in cuda["inference"])
    assert "median ms" in stdout and "peak MiB" in stdout and "goals" in stdout
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


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
