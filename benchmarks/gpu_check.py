"""The measurements of ``benchmarks/gpu_check.sh``, each writing a Markdown table (and its JSON)
to an output folder.

    python benchmarks/gpu_check.py families OUT [--device cuda] [--tiny] [--only V ...]
    python benchmarks/gpu_check.py losses OUT [--device cuda] [--iters 300] [--tiny]

``families``: every COCO family's training step (forward, losses, backward; batch 2 at
800 x 1216) and inference forward (batch 2), in float32 and under bfloat16 autocast: images
per second and, on CUDA, peak memory (``benchmarks/runner.py``, ``measure.py``). Goal: bfloat16
peak memory at most 0.7 of float32's.

``losses``: the deformable shapes config (``configs/quick_schedules/
dab_deformable_detr_R_18_shapes.yaml``) trained ``--iters`` iterations by ``train_net.py``
three times at once: float32 with seeds 1 and 2, and ``SOLVER.AMP.PRECISION bfloat16`` with
seed 1. The logged total loss (Detectron2's median of the last 20 iterations) side by side;
goal: bfloat16's distance from float32 with the same seed, averaged over the second half,
within the distance between the two float32 seeds (the spread of float32 training).

``--tiny`` (``gpu_check.sh --dry-run``): small models and inputs, a few iterations, on the
device given (CPU in CI), to check that everything runs; its figures measure nothing. Without
CUDA, train_net refuses AMP, so ``losses --device cpu`` runs its "bfloat16" run in float32.
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import cases  # noqa: E402
from benchmarks.cases import VARIANTS, Variant  # noqa: E402
from benchmarks.runner import Runner  # noqa: E402

SIZE = (800, 1216)
TINY_SIZE = (64, 96)
BATCH = 2
MEMORY_GOAL = 0.7  # bfloat16 peak memory / float32's, at most
SHAPES = "configs/quick_schedules/dab_deformable_detr_R_18_shapes.yaml"
# the families benchmark.py does not measure (no transformers counterpart to compare with);
# their model names are outside cases.MODELS, so that benchmark.py never selects them
EXTRA = {
    "DN-R50": Variant("dn_dab_detr", "COCO-Detection/dn_dab_detr_R_50_50ep.yaml", None),
    "DN-Deformable-R50": Variant(
        "dn_dab_deformable_detr", "COCO-Detection/dn_dab_deformable_detr_R_50_50ep.yaml", None),
    "Deformable-DAT-T": Variant(
        "dab_deformable_detr_dat", "COCO-Detection/dab_deformable_detr_DAT_T_50ep.yaml", None),
}
# the tiny models of --tiny (the SMALL overrides of tests/conftest.py)
TINY_OPTS = ["MODEL.DAB_DETR.HIDDEN_DIM", "64", "MODEL.DAB_DETR.DIM_FEEDFORWARD", "128",
             "MODEL.DAB_DETR.NHEADS", "4", "MODEL.DAB_DETR.ENC_LAYERS", "1",
             "MODEL.DAB_DETR.DEC_LAYERS", "2", "MODEL.DAB_DETR.NUM_QUERIES", "10"]


def families(out: str, device: str, tiny: bool, only: Optional[List[str]] = None
             ) -> List[Dict]:
    """Rows of every family's (or the ``only`` ones') training and inference cases, float32
    and bfloat16."""
    variants = dict(VARIANTS)
    variants.update({k: v for k, v in EXTRA.items()
                     if os.path.exists(os.path.join(REPO, "configs", v.config))})
    if only:
        unknown = sorted(set(only) - set(variants))
        if unknown:
            raise SystemExit(f"--only {unknown}: not among {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in only}
    cases.VARIANTS.update(variants)  # the harness builds a case's model by its variant's name
    if tiny:
        _shrink_configs()
    (h, w), (warmup, repeats) = (TINY_SIZE, (0, 1)) if tiny else (SIZE, (2, 5))
    runner = Runner({}, torch.get_num_threads())
    rows = []
    for variant in variants:
        for train in (True, False):
            section = "training" if train else "inference"
            batch = [runner.case("ours", variant, train=train, height=h, width=w, batch=BATCH,
                                 device=device, autocast=dtype)
                     for dtype in (None, "bfloat16")]
            rows += runner.measure(section, batch, warmup, repeats)
            print(f"[families] {variant} {section}: " + ", ".join(
                f"{r['dtype']} {_fmt(r['images_per_s'])} img/s" for r in rows[-2:]), flush=True)
        runner.release()
        for row in rows:
            row.pop("case", None)  # not JSON: its fields are the row's
        # after every family: a run stopped by its time limit leaves the families it measured
        _write(out, "families", rows, _families_table(rows, device, tiny), echo=False)
    print(_families_table(rows, device, tiny), flush=True)
    return rows


def _shrink_configs() -> None:
    """--tiny: every case's config made small (cases._cfg adds these options)."""
    build = cases._cfg
    cases._cfg = lambda variant, opts: build(variant, [*TINY_OPTS, *opts])


def _families_table(rows: List[Dict], device: str, tiny: bool) -> str:
    by = {(r["variant"], r["section"], r["dtype"]): r for r in rows}
    lines = [f"Families on {_device_name(device)}, batch {BATCH}, "
             f"{rows[0]['height']} x {rows[0]['width']}" + (" (--tiny: checks it runs)"
                                                             if tiny else ""),
             "",
             "| family | train img/s fp32 | train img/s bf16 | peak MiB fp32 | peak MiB bf16 "
             f"| bf16/fp32 memory (goal <= {MEMORY_GOAL}) | infer img/s fp32 "
             "| infer img/s bf16 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        t32, t16 = by[(variant, "training", "float32")], by[(variant, "training", "bfloat16")]
        i32, i16 = by[(variant, "inference", "float32")], by[(variant, "inference", "bfloat16")]
        ratio = _ratio(t16["peak_mib"], t32["peak_mib"])
        goal = "" if ratio is None else (" met" if ratio <= MEMORY_GOAL else " NOT met")
        errors = "; ".join(f"{r['section']} {r['dtype']}: {r['error']}"
                           for r in (t32, t16, i32, i16) if r["error"])
        lines.append(f"| {variant} | {_fmt(t32['images_per_s'])} | {_fmt(t16['images_per_s'])} "
                     f"| {_fmt(t32['peak_mib'], '{:.0f}')} | {_fmt(t16['peak_mib'], '{:.0f}')} "
                     f"| {_fmt(ratio)}{goal} | {_fmt(i32['images_per_s'])} "
                     f"| {_fmt(i16['images_per_s'])} | {errors} |")
    return "\n".join(lines) + "\n"


def losses(out: str, device: str, iters: int, tiny: bool) -> Dict:
    """Train the three runs at once; the side-by-side table of their logged losses."""
    from dab_detr.data import ensure_builtin_dataset, register_builtin_datasets

    runs = {"fp32_seed1": (1, False), "fp32_seed2": (2, False), "bf16_seed1": (1, True)}
    amp = device.startswith("cuda")
    register_builtin_datasets()
    ensure_builtin_dataset("dab_shapes_train")  # made here once, not raced for by the runs
    procs = {}
    for name, (seed, bf16) in runs.items():
        run_dir = os.path.join(out, "losses", name)
        os.makedirs(run_dir, exist_ok=True)
        opts = ["MODEL.DEVICE", device, "SEED", str(seed), "SOLVER.MAX_ITER", str(iters),
                "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "TEST.EVAL_PERIOD", "0",
                "DATASETS.TEST", "()", "OUTPUT_DIR", run_dir]
        if bf16 and amp:
            opts += ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]
        if tiny:
            opts += [*TINY_OPTS, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
                     "DATALOADER.NUM_WORKERS", "0"]
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
               os.path.join(REPO, SHAPES), *opts]
        log = open(os.path.join(run_dir, "stdout.txt"), "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO),
                       log)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    curves = {name: _logged_losses(os.path.join(out, "losses", name, "metrics.json"))
              for name in runs}
    result = {"iters": iters, "device": _device_name(device), "amp": amp, "failed": failed,
              "curves": {k: {str(i): v for i, v in c.items()} for k, c in curves.items()}}
    # --tiny: a few iterations, and no bfloat16 on CPU: nothing to judge
    result.update(_loss_goal(curves) if not tiny else
                  {"bf16_distance": None, "fp32_spread": None, "goal_met": None})
    _write(out, "losses", result, _losses_table(result, curves, tiny))
    return result


def _logged_losses(path: str) -> Dict[int, float]:
    """``{iteration: total_loss}`` of a run's metrics.json (every 20 iterations and the last)."""
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "total_loss" in record:
                out[record["iteration"]] = record["total_loss"]
    return out


def _loss_goal(curves: Dict[str, Dict[int, float]]) -> Dict:
    """Over the second half of the logged iterations common to the three runs: the mean
    |bf16 - fp32| (same seed) and the mean |fp32 seed 1 - fp32 seed 2|."""
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    late = common[len(common) // 2:]
    if not late:
        return {"bf16_distance": None, "fp32_spread": None, "goal_met": None}
    a, b, h = curves["fp32_seed1"], curves["fp32_seed2"], curves["bf16_seed1"]
    distance = sum(abs(h[i] - a[i]) for i in late) / len(late)
    spread = sum(abs(a[i] - b[i]) for i in late) / len(late)
    return {"bf16_distance": distance, "fp32_spread": spread, "goal_met": distance <= spread}


def _losses_table(result: Dict, curves: Dict[str, Dict[int, float]], tiny: bool) -> str:
    bf16 = "bf16 seed 1" if result["amp"] else "bf16 seed 1 (no CUDA: float32)"
    lines = [f"{SHAPES} on {result['device']}, {result['iters']} iterations"
             + (" (--tiny: checks it runs)" if tiny else ""), "",
             f"| iteration | fp32 seed 1 | fp32 seed 2 | {bf16} |", "|---|---|---|---|"]
    for it in sorted(set().union(*curves.values())):
        lines.append("| " + " | ".join([str(it + 1)] + [
            _fmt(curves[k].get(it), "{:.4f}") for k in ("fp32_seed1", "fp32_seed2",
                                                         "bf16_seed1")]) + " |")
    goal = result["goal_met"]
    distance = _fmt(result["bf16_distance"], "{:.4f}")
    spread = _fmt(result["fp32_spread"], "{:.4f}")
    verdict = "-" if goal is None else "met" if goal else "NOT met"
    lines += ["", f"Second half: mean |bf16 - fp32 (seed 1)| = {distance}, mean |fp32 seed 1 - "
              f"seed 2| = {spread}: goal {verdict}"]
    if result["failed"]:
        lines.append(f"Failed runs (see their stdout.txt): {', '.join(result['failed'])}")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _fmt(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _write(out: str, name: str, data, table: str, echo: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table)
    if echo:
        print(table, flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("families", "losses"))
    parser.add_argument("out", help="folder of the tables")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=300, help="losses: iterations per run")
    parser.add_argument("--tiny", action="store_true", help="small models: checks it runs")
    parser.add_argument("--only", nargs="+", help="families: these variants only")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu --tiny)")
    if args.what == "families":
        families(args.out, args.device, args.tiny, args.only)
    else:
        losses(args.out, args.device, args.iters, args.tiny)


if __name__ == "__main__":
    main()
