"""``tools/convergence_study.py`` end to end on a tiny budget: two variants trained two at a
time, the plot and the table written, and a second call reusing the finished runs."""

import os
import re
import sys
import time

import pytest

from conftest import REPO, SMALL

pytest.importorskip("matplotlib")
sys.path.insert(0, os.path.join(REPO, "tools"))

import convergence_study  # noqa: E402


def _small_opts():
    """SMALL without its TEST.EVAL_PERIOD: the study sets that one."""
    pairs = list(zip(SMALL[::2], SMALL[1::2]))
    return [x for key, value in pairs if key != "TEST.EVAL_PERIOD" for x in (key, value)]


def test_study_runs_two_variants_and_reports(tmp_path, monkeypatch):
    # the train_net subprocesses generate their own dab_shapes here (both at once: the
    # generator's atomic writes make that safe)
    monkeypatch.setenv("DAB_DETR_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- convergence-table -->\nold\n<!-- /convergence-table -->\nend\n")
    argv = ["--output-dir", str(out), "--max-iter", "4", "--eval-period", "2", "--jobs", "2",
            "--variants", "full", "dab_deformable_detr", "--readme", str(readme),
            "--opts", *_small_opts()]
    convergence_study.main(argv)

    assert (out / "convergence.png").stat().st_size > 10_000
    table = (out / "convergence.md").read_text()
    for name in ("full", "dab_deformable_detr"):
        # AP, AP50, AP75 and the final training loss, all numbers
        assert re.search(rf"^\| {name} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", table,
                         re.MULTILINE), table
        log = (out / name / "train_stdout.txt").read_text()
        assert "Evaluation results for bbox" in log
    assert (out / "full" / "study_run.json").exists()
    text = readme.read_text()
    assert text.startswith("intro\n<!-- convergence-table -->\n| variant |") and "old" not in text
    assert text.endswith("| dab_deformable_detr |" + table.split("| dab_deformable_detr |")[1]
                         + "<!-- /convergence-table -->\nend\n")

    before = (out / "full" / "train_stdout.txt").stat().st_size
    convergence_study.main(argv)  # finished variants are skipped, the report rewritten
    assert (out / "full" / "train_stdout.txt").stat().st_size == before


def test_other_models_run_only_when_named():
    configs = convergence_study.variant_configs()
    assert "dab_deformable_detr" in configs and "no_hw_modulation" in configs
    args = convergence_study.parse_args(["--max-iter", "4"])
    assert "dab_deformable_detr" not in args.variants and "no_hw_modulation" in args.variants


def test_changed_settings_are_refused(tmp_path):
    out = tmp_path / "study"
    (out / "full").mkdir(parents=True)
    (out / "full" / "study_run.json").write_text('{"max_iter": 1}')
    with pytest.raises(SystemExit, match="was trained with"):
        convergence_study.main(["--output-dir", str(out), "--max-iter", "4",
                                "--variants", "full"])


def test_a_failed_variant_stops_the_study(tmp_path, monkeypatch):
    started = []

    def run_variant(name, config_file, args, threads=None):
        started.append(name)
        if name == "full":
            raise SystemExit("full: train_net.py exited with 1")
        time.sleep(0.2)
        return str(tmp_path / name)

    monkeypatch.setattr(convergence_study, "run_variant", run_variant)
    with pytest.raises(SystemExit, match="full: train_net.py exited with 1"):
        convergence_study.main(["--output-dir", str(tmp_path), "--max-iter", "4"])
    # the queued variants are cancelled instead of trained before the error shows
    assert started[0] == "full" and len(started) < len(convergence_study.variant_configs())


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    with pytest.raises(SystemExit, match="README.md: needs one <!-- convergence-table -->"):
        convergence_study.update_readme(str(readme), "| a |\n")
    assert readme.read_text() == "no table here\n"
