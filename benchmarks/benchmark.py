"""Speed and memory of this project's DAB-DETR, DETR and Conditional DETR against transformers'
DabDetrForObjectDetection, DetrForObjectDetection and ConditionalDetrForObjectDetection on the
same weights, and of this project's DAB-Deformable-DETR and DINO (no transformers counterpart).

    python benchmarks/benchmark.py [--quick] [--output benchmarks/results.json]
                                   [--plot benchmarks/scaling.png] [--threads N]
                                   [--memory-jobs N] [--models M ...] [--variants V ...]
                                   [--sections S ...] [--merge] [--repeats N]

Sections (CPU; on CUDA, when there is one, inference and training again in float32 and
under bfloat16 / float16 autocast):
  inference  forward pass, R50, R50-DC5, Deformable-R50, DETR-R50, Conditional-R50 and
             DINO-R50 (4-scale), 800 x 1216, batch 1 and 2
  training   forward, loss and backward, the same variants, 512 x 768, batch 2
  share      the Deformable-R50 and DINO-R50 inference and training cases: the share of
             their time spent in deformable attention (``attention_share.py``)
  scaling    R50 batch 1 against the short side (480 ... 1024, long side 1.52 x), and
             ours against the number of queries (100, 300, 900)
``--models`` (dab_detr, dab_deformable_detr, detr, conditional_detr, dino), ``--variants`` and
``--sections`` (inference, training, share, scaling, cuda) select what runs; ``--merge`` keeps
the other rows of an existing ``--output`` (``results.py``).
``--quick``: tiny inputs, batch 1 at inference, one timed repeat and no warm-up: it checks
that everything runs (in about a minute), not how fast.
See ``measure.py`` for how latency and memory are measured.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import report, results  # noqa: E402
from benchmarks.attention_share import METHOD, attention_share  # noqa: E402
from benchmarks.cases import (  # noqa: E402
    DEFORMABLE_MODELS,
    IMPLS,
    MODELS,
    NUM_QUERIES,
    VARIANTS,
    impls,
    make_step,
    prepare_weights,
)
from benchmarks.measure import start_memory_server  # noqa: E402
from benchmarks.runner import Runner  # noqa: E402


@dataclass(frozen=True)
class Settings:
    inference_size: Tuple[int, int]
    batches: Tuple[int, ...]
    train_size: Tuple[int, int]
    train_batch: int
    short_sides: Tuple[int, ...]
    queries: Tuple[int, ...]
    warmup: int
    repeats: int  # inference
    scaling_repeats: int  # training and scaling
    share_repeats: int  # measured steps of each attention-share case (after warm-up)


SECTIONS = ("inference", "training", "share", "scaling", "cuda")  # of --sections
# the results' sections of CPU rows with latency and memory
CPU_SECTIONS = ("inference", "training", "scaling_size", "scaling_queries")
FULL = Settings((800, 1216), (1, 2), (512, 768), 2, (480, 640, 800, 1024), (100, 300, 900),
                warmup=1, repeats=5, scaling_repeats=3, share_repeats=1)
QUICK = Settings((64, 96), (1,), (64, 96), 2, (64, 96), (100, 300), warmup=0, repeats=1,
                 scaling_repeats=1, share_repeats=1)


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:.0f} s] {text}", flush=True)


def long_side(short: int) -> int:
    """The long side of a short x long input of 800 x 1216's aspect, a multiple of 32."""
    return max(32, round(short * 1216 / 800 / 32) * 32)


def run_pairs(runner: Runner, section: str, s: Settings, size: Tuple[int, int],
              batches: Sequence[int], train: bool, variants: Sequence[str],
              device: str = "cpu", autocast: Optional[str] = None) -> List[Dict]:
    """Each variant's implementations (both, or ours alone) timed together, per batch."""
    rows = []
    for variant in variants:
        for batch in batches:
            cases = [runner.case(impl, variant, train=train, height=size[0], width=size[1],
                                 batch=batch, device=device, autocast=autocast)
                     for impl in impls(variant)]
            repeats = s.scaling_repeats if train else s.repeats
            rows += runner.measure(section, cases, s.warmup, repeats)
            progress(report.format_table(f"[{section}] {variant} B={batch}",
                                         rows[-len(cases):]))
    return rows


def run_attention_share(runner: Runner, s: Settings, variants: Sequence[str]) -> List[Dict]:
    """The share of deformable attention in the inference and training cases of the
    DAB-Deformable-DETR and DINO variants (on the models timed, if they were)."""
    sizes = [(False, s.inference_size, b) for b in s.batches]
    sizes += [(True, s.train_size, s.train_batch)]
    rows = []
    for variant in (v for v in variants if VARIANTS[v].model in DEFORMABLE_MODELS):
        for train, (h, w), batch in sizes:
            case = runner.case("ours", variant, train=train, height=h, width=w, batch=batch)
            row = {"model": VARIANTS[variant].model, "variant": variant, "train": train,
                   "height": h, "width": w, "batch": batch, "error": None}
            try:
                model = runner.model(case)
                row.update(attention_share(model, make_step(case, model), s.warmup,
                                           s.share_repeats))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            progress(report.format_shares(rows[-1:], METHOD).split("\n")[1])
    return rows


def run_scaling(runner: Runner, s: Settings) -> Tuple[List[Dict], List[Dict]]:
    """Each curve's points are timed together (interleaved), so that a change of the
    machine's load shifts a whole curve rather than bending it."""
    cases = [runner.case(impl, "R50", train=False, height=short, width=long_side(short),
                         batch=1) for short in s.short_sides for impl in IMPLS]
    by_size = runner.measure("scaling", cases, s.warmup, s.scaling_repeats)
    progress(report.format_table("[scaling] short side", by_size))
    h, w = s.inference_size
    # the configs' query count is the inference case (same weights, memory measured once)
    cases = [runner.case("ours", "R50", train=False, height=h, width=w, batch=1,
                         num_queries=None if nq == NUM_QUERIES else nq) for nq in s.queries]
    by_queries = runner.measure("queries", cases, s.warmup, s.scaling_repeats)
    progress(report.format_table("[queries]", by_queries))
    return by_size, by_queries


def run_cuda(runner: Runner, s: Settings, variants: Sequence[str]) -> Dict:
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available"}
    out = {"device_name": torch.cuda.get_device_name(), "inference": [], "training": []}
    for autocast in (None, "bfloat16", "float16"):
        out["inference"] += run_pairs(runner, "inference", s, s.inference_size, s.batches,
                                      False, variants, "cuda", autocast)
        out["training"] += run_pairs(runner, "training", s, s.train_size, (s.train_batch,),
                                     True, variants, "cuda", autocast)
    out["ratios"] = report.ratios(out["inference"] + out["training"])
    return out


def _meta(args: argparse.Namespace, s: Settings, variants: Sequence[str]) -> Dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "settings": s.__dict__, "threads": args.threads, "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "selection": {"variants": list(variants), "sections": list(args.sections)},
        "ours": "DABDETR / DABDeformableDETR / DETR / ConditionalDETR / DINO .forward_predictions("
                "images, with_aux=False) (the inference path); training: model(batched_inputs) "
                "losses summed, backward",
        "transformers_model": "DabDetr / Detr / ConditionalDetr ForObjectDetection("
                              "pixel_values, pixel_mask), timm "
                              "ResNet; training: labels given, .loss backward, dropout as "
                              "ours (0 for DAB-DETR, 0.1 for DETR and Conditional DETR), "
                              "auxiliary_loss, stem and layer1 frozen as ours",
        "dab_deformable_detr": "configs/" + VARIANTS["Deformable-R50"].config + ", MODEL.WEIGHTS "
                               "'' (random initialisation, seed 0), MODEL.DEVICE cpu; "
                               "transformers has no counterpart: no comparison",
        "dino": "configs/" + VARIANTS["DINO-R50"].config + " (4-scale, 900 queries; training "
                "with contrastive denoising), MODEL.WEIGHTS '' (random initialisation, seed 0), "
                "MODEL.DEVICE cpu; transformers has no counterpart: no comparison",
        "memory_method": "CPU: fresh process per case, peak RSS (VmHWM after clear_refs) "
                         "minus RSS after building model and inputs, malloc mmap threshold "
                         "64 KiB; CUDA: max_memory_allocated minus allocated before the step",
        "timing_method": "wall clock per step, implementations interleaved (ABBA)",
        "attention_share_method": METHOD,
    }


def _variants(args: argparse.Namespace) -> List[str]:
    """The selected variants, in ``VARIANTS`` order."""
    chosen = [v for v in VARIANTS if VARIANTS[v].model in args.models
              and (args.variants is None or v in args.variants)]
    if not chosen:
        raise SystemExit(f"no variant of --models {args.models} in --variants {args.variants}")
    return chosen


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results.json"))
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "scaling.png"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-jobs", type=int, default=2,
                        help="memory measurements run at a time (each in its own process)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: every variant of --models")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="scaling needs the R50 variant")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --output that this run does not "
                             "measure (each row records its run's date)")
    parser.add_argument("--repeats", type=int, help="timed steps at inference (default: 5; "
                        "training, scaling and queries get 3 or this, whichever is smaller)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.repeats:
        s = dataclasses.replace(s, repeats=args.repeats,
                                scaling_repeats=min(s.scaling_repeats, args.repeats))
    variants = _variants(args)
    out = {"meta": _meta(args, s, variants)}
    start_memory_server()  # while the weights are prepared
    with tempfile.TemporaryDirectory() as workdir:
        weights = {v: prepare_weights(v, workdir) for v in variants
                   if VARIANTS[v].transformers is not None}
        progress("prepared the weights")
        runner = Runner(weights, args.threads)
        for train, section in ((False, "inference"), (True, "training")):
            size, batches = (s.train_size, (s.train_batch,)) if train else (
                s.inference_size, s.batches)
            out[section] = (run_pairs(runner, section, s, size, batches, train, variants)
                            if section in args.sections else [])
        out["attention_share"] = (run_attention_share(runner, s, variants)
                                  if "share" in args.sections else [])
        runner.release(keep=["R50"])
        scaling = "scaling" in args.sections and "R50" in variants
        out["scaling_size"], out["scaling_queries"] = (run_scaling(runner, s) if scaling
                                                       else ([], []))
        runner.release()
        cpu_rows = [r for k in CPU_SECTIONS for r in out[k]]
        progress(f"measuring the peak memory of {len({r['case'] for r in cpu_rows})} cases, "
                 f"{args.memory_jobs} at a time")
        runner.fill_memory(cpu_rows, args.memory_jobs)
        out["cuda"] = (run_cuda(runner, s, variants) if "cuda" in args.sections
                       else {"not_selected": "not in --sections"})
    for row in cpu_rows + out["cuda"].get("inference", []) + out["cuda"].get("training", []):
        del row["case"]  # not JSON: its fields are the row's
    for row in (r for k in results.ROW_SECTIONS for r in out[k]):
        row["date"] = out["meta"]["date"]
    earlier = results.load(args.output) if args.merge else None
    if earlier is not None:
        progress(f"kept {results.merge_earlier(out, earlier)} rows of {args.output}")
    out["ratios"] = report.ratios(out["inference"] + out["training"] + out["scaling_size"])
    out["goals"] = report.goals(out["ratios"])
    out["meta"]["load_average_end"] = os.getloadavg()
    title = f"DAB-DETR on CPU (threads: {args.threads}){', quick' if args.quick else ''}"
    results.write(out, args.output, args.plot if scaling else None, title)
    return out


if __name__ == "__main__":
    main()
