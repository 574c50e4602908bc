"""``benchmarks/gpu_check.sh``: its CPU part (``--dry-run``) runs and writes every table, and
the losses table judges bfloat16 against the spread of float32 as its docstring says.

The dry run here measures one family and leaves out the losses step (three train_net processes
at once: most of a minute on two cores), whose table is checked on written metrics, and the
attention benchmark (its own tests cover it).
"""

import json
import os
import subprocess

import pytest
import torch

from benchmarks import gpu_check
from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def test_dry_run_writes_the_tables_of_every_step(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([SCRIPT, "--dry-run", "--out", str(out), "--only", "Deformable-R50",
                           "--skip", "losses", "attention"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| CUDA tests | ok |" in summary and "| families | ok |" in summary
    assert "| losses | skipped (--skip losses) |" in summary
    attention = os.path.exists(os.path.join(REPO, "benchmarks", "deformable_attention.py"))
    assert ("| deformable attention | skipped (--skip attention) |" if attention
            else "does not exist") in summary
    # the CUDA tests it would run: those marked cuda and the one named for CUDA
    tests = (out / "cuda_tests.txt").read_text()
    for name in ("test_amp.py::test_cuda_autocast_step_of_every_family[dino_R_18-bf16]",
                 "test_sync_free.py::test_cuda_forward_syncs_only_in_the_matcher[dab_detr_R_18]",
                 "test_ms_deform_attn.py::test_core_cuda_matches_cpu"):
        assert name in tests, name
    assert f"torch {torch.__version__}" in (out / "environment.md").read_text()
    rows = json.loads((out / "families.json").read_text())
    assert [(r["variant"], r["section"], r["dtype"]) for r in rows] == [
        ("Deformable-R50", s, d) for s in ("training", "inference")
        for d in ("float32", "bfloat16")]
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    assert "| Deformable-R50 |" in (out / "families.md").read_text()


def test_the_full_check_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the full check would run")
    proc = subprocess.run([SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "CUDA is not available here; --dry-run runs the CPU part" in proc.stderr


def _metrics(path, losses):
    path.mkdir(parents=True)
    with open(path / "metrics.json", "w") as f:
        for it, loss in losses.items():
            f.write(json.dumps({"iteration": it, "total_loss": loss, "lr": 1e-4}) + "\n")


@pytest.mark.parametrize("bf16, met", [([5.0, 4.1, 3.05, 2.0], True),
                                       ([5.0, 4.0, 3.3, 2.3], False)])
def test_losses_goal_is_bf16_distance_within_the_fp32_seed_spread(tmp_path, bf16, met):
    its = [19, 39, 59, 79]
    curves = {"fp32_seed1": [5.0, 4.0, 3.0, 2.0], "fp32_seed2": [5.2, 4.1, 3.1, 2.2],
              "bf16_seed1": bf16}
    for name, values in curves.items():
        _metrics(tmp_path / name, dict(zip(its, values)))
    read = {name: gpu_check._logged_losses(str(tmp_path / name / "metrics.json"))
            for name in curves}
    goal = gpu_check._loss_goal(read)
    # the second half: iterations 59 and 79; fp32 spread (0.1 + 0.2) / 2
    assert goal["fp32_spread"] == pytest.approx(0.15)
    distance = (abs(bf16[2] - 3.0) + abs(bf16[3] - 2.0)) / 2
    assert goal["bf16_distance"] == pytest.approx(distance)
    assert goal["goal_met"] is met
    result = {"iters": 80, "device": "CPU", "amp": True, "failed": [], **goal}
    table = gpu_check._losses_table(result, read, tiny=False)
    assert f"| 80 | 2.0000 | 2.2000 | {bf16[3]:.4f} |" in table
    assert ("goal met" if met else "goal NOT met") in table
