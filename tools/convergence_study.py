#!/usr/bin/env python
"""Train the full shapes model and each ablation with the same budget and seed, then compare
how their AP grows.

    python tools/convergence_study.py --output-dir output/convergence [--max-iter N] \\
        [--eval-period 500] [--jobs 2] [--variants full no_hw_modulation ...] \\
        [--opts MODEL.DEVICE cuda]

Variants: ``full`` (configs/quick_schedules/dab_detr_R_18_shapes.yaml) and every config in
configs/quick_schedules/ablations/, named by file; on request (``--variants``) also
``dab_deformable_detr``, ``dn_dab_detr`` (the same model trained with denoising queries),
the baselines ``detr`` and ``conditional_detr``, and ``dn_dab_deformable_detr`` and ``dino`` (each
configs/quick_schedules/<name>_R_18_shapes.yaml), and ``dab_deformable_detr_dat``
(dab_deformable_detr_DAT_shapes.yaml: a DAT backbone) with the same budget. Each
runs ``train_net.py`` in a subprocess with ``SOLVER.MAX_ITER``, ``SOLVER.STEPS`` scaled from
the config's schedule, ``TEST.EVAL_PERIOD``, ``SEED`` and ``OUTPUT_DIR <output-dir>/<variant>``;
its console output goes to ``train_stdout.txt`` there. ``--jobs N`` trains N variants at a
time, each with 1/N of the CPU cores (``OMP_NUM_THREADS``). Resume-friendly: a finished variant (its
``study_run.json`` written) is skipped, an interrupted one continues from its last
checkpoint with ``--resume``. Finally writes ``convergence.png`` (AP and loss against
iteration, all variants) and ``convergence.md`` (final AP, AP50, AP75 of each variant, and
its mean training loss over the last tenth of the run); ``--readme docs/studies.md`` also puts
that table between the page's ``<!-- convergence-table -->`` and ``<!-- /convergence-table -->``
lines.
"""

import argparse
import concurrent.futures
import glob
import json
import logging
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from plot_metrics import load_metrics, series  # noqa: E402  (tools/, the script's folder)

logger = logging.getLogger("convergence_study")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "dab_detr_R_18_shapes.yaml")
ABLATIONS = os.path.join(REPO, "configs", "quick_schedules", "ablations")
MARKER = "study_run.json"


# Other models of the same size on the same data, run only when named in --variants.
OTHER_MODELS = {
    "dab_deformable_detr": os.path.join(REPO, "configs", "quick_schedules",
                                        "dab_deformable_detr_R_18_shapes.yaml"),
    "dn_dab_detr": os.path.join(REPO, "configs", "quick_schedules",
                                "dn_dab_detr_R_18_shapes.yaml"),
    # the baselines, with the same backbone, sizes and schedule
    "detr": os.path.join(REPO, "configs", "quick_schedules", "detr_R_18_shapes.yaml"),
    "conditional_detr": os.path.join(REPO, "configs", "quick_schedules",
                                     "conditional_detr_R_18_shapes.yaml"),
    # DINO and its baseline
    "dn_dab_deformable_detr": os.path.join(REPO, "configs", "quick_schedules",
                                           "dn_dab_deformable_detr_R_18_shapes.yaml"),
    "dino": os.path.join(REPO, "configs", "quick_schedules", "dino_R_18_shapes.yaml"),
    # dab_deformable_detr with a CPU-sized DAT backbone instead of the ResNet-18
    "dab_deformable_detr_dat": os.path.join(REPO, "configs", "quick_schedules",
                                            "dab_deformable_detr_DAT_shapes.yaml"),
}


def variant_configs() -> Dict[str, str]:
    """``{"full": the shapes config, <ablation file name>: its config, <other model>: its
    config}``, full first."""
    configs = {"full": FULL_CONFIG}
    for path in sorted(glob.glob(os.path.join(ABLATIONS, "*.yaml"))):
        configs[os.path.splitext(os.path.basename(path))[0]] = path
    configs.update(OTHER_MODELS)
    return configs


def scaled_steps(config_file: str, max_iter: int) -> Tuple[int, ...]:
    """The config's ``SOLVER.STEPS`` scaled by ``max_iter / SOLVER.MAX_ITER``."""
    import dab_detr  # noqa: F401  (prepares Detectron2's import)
    from dab_detr.config import get_dab_detr_cfg

    solver = get_dab_detr_cfg(config_file).SOLVER
    return tuple(max(1, round(s * max_iter / solver.MAX_ITER)) for s in solver.STEPS)


def run_variant(
    name: str, config_file: str, args: argparse.Namespace, threads: Optional[int] = None
) -> str:
    """Train one variant unless it already finished (``threads``: its ``OMP_NUM_THREADS``,
    None: inherited); returns its output folder."""
    out = os.path.join(args.output_dir, name)
    steps = scaled_steps(config_file, args.max_iter)
    settings = {"config": os.path.relpath(config_file, REPO), "max_iter": args.max_iter,
                "steps": list(steps), "eval_period": args.eval_period, "seed": args.seed,
                "opts": list(args.opts)}
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        if done != settings:
            raise SystemExit(f"{out} was trained with {done}, not {settings}: use another "
                             "--output-dir, or delete that folder")
        logger.info("%s: finished before, skipped", name)
        return out
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file,
           "--num-gpus", str(args.num_gpus)]
    resume = os.path.exists(os.path.join(out, "last_checkpoint"))
    if resume:
        cmd.append("--resume")
    cmd += ["SOLVER.MAX_ITER", str(args.max_iter), "SOLVER.STEPS", str(steps),
            "TEST.EVAL_PERIOD", str(args.eval_period), "SEED", str(args.seed),
            "OUTPUT_DIR", out, *args.opts]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "train_stdout.txt")
    logger.info("%s: %s (output in %s)", name, "resuming" if resume else "training", log_path)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a", encoding="utf-8") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              env=env).returncode
    if code != 0:
        raise SystemExit(f"{name}: train_net.py exited with {code}; see {log_path}")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    return out


def final_ap(records: Sequence[Dict]) -> Dict[str, Optional[float]]:
    """AP, AP50 and AP75 of the last evaluation, None where the run never evaluated."""
    evaluated = [r for r in records if "bbox/AP" in r]
    last = evaluated[-1] if evaluated else {}
    return {k: last.get(f"bbox/{k}") for k in ("AP", "AP50", "AP75")}


def final_loss(records: Sequence[Dict], max_iter: int) -> Optional[float]:
    """Mean ``total_loss`` over the last tenth of the iterations (None: nothing logged)."""
    iters, values = series(records, "total_loss")
    last = [v for i, v in zip(iters, values) if i >= 0.9 * max_iter - 1]
    return sum(last) / len(last) if last else None


START, END = "<!-- convergence-table -->", "<!-- /convergence-table -->"


def update_readme(path: str, table: str) -> None:
    """Replace what lies between the START and END marker lines of ``path`` with ``table``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: needs one {START} line followed by one {END} line")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{table}{END}{tail}")


def write_report(runs: Dict[str, List[Dict]], output_dir: str, max_iter: int) -> str:
    """``convergence.png`` and ``convergence.md`` from each variant's metrics records;
    returns the table."""
    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, records in runs.items():
        iters, values = series(records, "bbox/AP")
        ax_ap.plot(iters, values, marker="o", ms=3, label=name)
        iters, values = series(records, "total_loss")
        ax_loss.plot(iters, values, linewidth=1, label=name,
                     marker="." if len(iters) < 20 else None)  # a short run: show its points
    ax_ap.set(xlabel="iteration", ylabel="bbox AP (%)", title="AP on dab_shapes_val")
    ax_loss.set(xlabel="iteration", ylabel="total loss", title="training loss")
    ax_loss.set_yscale("log")
    for ax in (ax_ap, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DAB-DETR ablations, {max_iter} iterations each, same seed")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "convergence.png"), dpi=100)
    plt.close(fig)

    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"Final bbox AP (%) on dab_shapes_val after {max_iter} iterations, and the mean "
             "training loss over the last tenth of them.", "",
             "| variant | AP | AP50 | AP75 | training loss, last tenth |", "|---|---|---|---|---|"]
    for name, records in runs.items():
        ap, loss = final_ap(records), final_loss(records, max_iter)
        loss_text = "-" if loss is None else f"{loss:.2f}"
        lines.append(f"| {name} | {fmt(ap['AP'])} | {fmt(ap['AP50'])} | {fmt(ap['AP75'])} "
                     f"| {loss_text} |")
    table = "\n".join(lines[2:]) + "\n"
    with open(os.path.join(output_dir, "convergence.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:2]) + "\n" + table)
    return table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    configs = variant_configs()
    parser = argparse.ArgumentParser(description="DAB-DETR ablations with one budget")
    parser.add_argument("--output-dir", default="output/convergence")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="iterations of every run (default: the full config's)")
    parser.add_argument("--eval-period", type=int, default=500,
                        help="evaluate every this many iterations (and at the end)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants trained at a time, sharing the CPU cores")
    parser.add_argument("--variants", nargs="+", choices=list(configs),
                        default=[v for v in configs if v not in OTHER_MODELS],
                        help="default: the full model and its ablations; also "
                             f"{', '.join(OTHER_MODELS)} (the same budget)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help="also write the table between the convergence-table markers of FILE")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides for every run, e.g. MODEL.DEVICE cuda")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    configs = variant_configs()
    args = parse_args(argv)
    args.output_dir = os.path.abspath(args.output_dir)  # train_net runs from the repository
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.max_iter is None:
        import dab_detr  # noqa: F401  (prepares Detectron2's import)
        from dab_detr.config import get_dab_detr_cfg

        args.max_iter = get_dab_detr_cfg(FULL_CONFIG).SOLVER.MAX_ITER
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // args.jobs) if args.jobs > 1 else None
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    futures = {name: pool.submit(run_variant, name, configs[name], args, threads)
               for name in args.variants}
    try:
        concurrent.futures.wait(futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in futures.values() if f.done() and f.exception() is not None]
        if failed:
            failed[0].result()  # raise it now: the variants not started yet never start
        outs = {name: future.result() for name, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    runs = {name: load_metrics(os.path.join(out, "metrics.json")) for name, out in outs.items()}
    table = write_report(runs, args.output_dir, args.max_iter)
    if args.readme:
        update_readme(args.readme, table)
    logger.info("wrote %s", os.path.join(args.output_dir, "convergence.{png,md}"))


if __name__ == "__main__":
    main()
