"""``tools/compare_seeds.py``: min / median / max over seeds of each evaluation, and its
picture, from the metrics.json of several runs."""

import json
import os
import subprocess
import sys

from conftest import REPO

TOOL = os.path.join(REPO, "tools", "compare_seeds.py")


def _run(folder, ap50s):
    """A metrics.json with losses every 20 iterations and AP at 500 and 1000."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.json", "w") as f:
        for it in range(0, 1001, 20):
            f.write(json.dumps({"iteration": it, "total_loss": 10.0 - it / 200}) + "\n")
        for it, ap50 in zip((500, 1000), ap50s):
            f.write(json.dumps({"iteration": it, "bbox/AP": ap50 / 2, "bbox/AP50": ap50,
                                "bbox/AP75": ap50 / 4}) + "\n")


def test_table_and_picture_over_seeds(tmp_path):
    for seed, (a, b) in enumerate([((10, 30), (12, 40)), ((20, 50), (14, 44)),
                                   ((15, 40), (16, 60))]):
        _run(tmp_path / f"seed{seed}" / "plain", a)
        _run(tmp_path / f"seed{seed}" / "dn", b)
    out, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    result = subprocess.run(
        [sys.executable, TOOL, "--output", str(out), "--markdown", str(md),
         "--variant", f"plain={tmp_path}/seed*/plain/metrics.json",
         "--variant", f"dn={tmp_path}/seed*/dn/metrics.json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    rows = md.read_text().splitlines()
    assert rows == result.stdout.splitlines()
    # plain at 1000: AP50 30, 50, 40 -> 30.0 / 40.0 / 50.0; AP 15 / 20 / 25; AP75 7.5 / 10 / 12.5
    plain = "| plain | 1000 | 3 | 15.0 / 20.0 / 25.0 | 30.0 / 40.0 / 50.0 | 7.5 / 10.0 / 12.5 |"
    assert plain in rows
    assert "| dn | 500 | 3 | 6.0 / 7.0 / 8.0 | 12.0 / 14.0 / 16.0 | 3.0 / 3.5 / 4.0 |" in rows
    assert len(rows) == 2 + 4


def test_a_glob_matching_nothing_is_refused(tmp_path):
    result = subprocess.run([sys.executable, TOOL, "--output", str(tmp_path / "x.png"),
                             "--variant", f"none={tmp_path}/nothing*/metrics.json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "matches no file" in result.stderr
