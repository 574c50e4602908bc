"""Speed and memory of this project's DAB-DETR against transformers' DabDetrForObjectDetection
on the same weights.

    python benchmarks/benchmark.py [--quick] [--output benchmarks/results.json]
                                   [--plot benchmarks/scaling.png] [--threads N]
                                   [--memory-jobs N]

Sections (CPU; on CUDA, when there is one, inference and training again in float32 and
under bfloat16 / float16 autocast):
  inference  forward pass, R50 and R50-DC5, 800 x 1216, batch 1 and 2
  training   forward, loss and backward, R50 and R50-DC5, 512 x 768, batch 2
  scaling    R50 batch 1 against the short side (480 ... 1024, long side 1.52 x), and
             ours against the number of queries (100, 300, 900)
``--quick``: tiny inputs, batch 1 at inference, one timed repeat and no warm-up: it checks
that everything runs (in about a minute), not how fast.
See ``measure.py`` for how latency and memory are measured.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.cases import (  # noqa: E402
    IMPLS,
    NUM_QUERIES,
    VARIANTS,
    Case,
    build_model,
    make_step,
    model_key,
    prepare_weights,
)
from benchmarks.measure import (  # noqa: E402
    peak_memory_cpu,
    peak_memory_cuda,
    start_memory_server,
    time_interleaved,
)


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


SECTIONS = ("inference", "training", "scaling_size", "scaling_queries")  # on CPU
FULL = Settings((800, 1216), (1, 2), (512, 768), 2, (480, 640, 800, 1024), (100, 300, 900),
                warmup=1, repeats=5, scaling_repeats=3)
QUICK = Settings((64, 96), (1,), (64, 96), 2, (64, 96), (100, 300), warmup=0, repeats=1,
                 scaling_repeats=1)


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:.0f} s] {text}", flush=True)


def long_side(short: int) -> int:
    """The long side of a short x long input of 800 x 1216's aspect, a multiple of 32."""
    return max(32, round(short * 1216 / 800 / 32) * 32)


class Runner:
    """Builds each model once, times cases together, and measures their memory."""

    def __init__(self, weights: Dict[str, Dict[str, str]], threads: int):
        self.weights = weights
        self.threads = threads
        self.models: Dict[tuple, torch.nn.Module] = {}

    def case(self, impl: str, variant: str, **kwargs) -> Case:
        weights = None if kwargs.get("num_queries") else self.weights[variant][impl]
        return Case(impl=impl, variant=variant, weights=weights, **kwargs)

    def _model(self, case: Case) -> torch.nn.Module:
        key = model_key(case)
        if key not in self.models:
            self.models[key] = build_model(case)
        return self.models[key]

    def measure(self, section: str, cases: Sequence[Case], warmup: int, repeats: int
                ) -> List[Dict]:
        """Rows for ``cases``, timed together (interleaved); a case that fails gets an
        ``error`` instead of numbers. CPU memory is left to ``fill_memory``."""
        device = cases[0].device
        try:
            steps = [make_step(c, self._model(c)) for c in cases]
            latencies = time_interleaved(steps, device, warmup, repeats)
        except Exception as e:  # e.g. an autocast dtype a model does not support
            return [self._row(section, c, error=f"{type(e).__name__}: {e}") for c in cases]
        peaks = [peak_memory_cuda(s) if device == "cuda" else {} for s in steps]
        del steps
        gc.collect()
        return [self._row(section, c, latency, peak)
                for c, latency, peak in zip(cases, latencies, peaks)]

    def fill_memory(self, rows: Sequence[Dict], jobs: int) -> None:
        """Peak memory of the CPU rows' cases, each case once, in ``jobs`` fresh processes
        at a time (after all timing: they would disturb it; not each other's peaks)."""
        todo = list({r["case"] for r in rows if r["device"] == "cpu" and not r["error"]})
        with ThreadPoolExecutor(jobs) as pool:
            peaks = dict(zip(todo, pool.map(lambda c: peak_memory_cpu(c, self.threads),
                                            todo)))
        for r in rows:
            if r["case"] in peaks:
                peak = peaks[r["case"]]
                r.update(peak_mib=peak.get("peak_mib"), baseline_mib=peak.get("baseline_mib"),
                         error=peak.get("error"))

    @staticmethod
    def _row(section: str, case: Case, latency: Optional[Dict] = None,
             peak: Optional[Dict] = None, error: Optional[str] = None) -> Dict:
        peak = peak or {}
        latency = latency or {"median": None, "min": None, "max": None, "q1": None,
                              "q3": None, "repeats": 0}
        median = latency["median"]
        return {
            "section": section, "impl": case.impl, "variant": case.variant,
            "train": case.train, "device": case.device, "dtype": case.autocast or "float32",
            "height": case.height, "width": case.width, "short_side": case.height,
            "batch": case.batch, "num_queries": case.num_queries or NUM_QUERIES,
            "latency_ms": latency,
            "images_per_s": case.batch * 1000 / median if median else None,
            "peak_mib": peak.get("peak_mib"), "baseline_mib": peak.get("baseline_mib"),
            "error": error or peak.get("error"), "case": case,
        }

    def release(self, keep: Sequence[str] = ()) -> None:
        """Free the built models except those of the ``keep`` variants."""
        self.models = {k: m for k, m in self.models.items() if k[1] in keep and not k[3]}
        gc.collect()


def run_pairs(runner: Runner, section: str, s: Settings, size: Tuple[int, int],
              batches: Sequence[int], train: bool, device: str = "cpu",
              autocast: Optional[str] = None) -> List[Dict]:
    rows = []
    for variant in VARIANTS:
        for batch in batches:
            cases = [runner.case(impl, variant, train=train, height=size[0], width=size[1],
                                 batch=batch, device=device, autocast=autocast)
                     for impl in IMPLS]
            repeats = s.scaling_repeats if train else s.repeats
            rows += runner.measure(section, cases, s.warmup, repeats)
            progress(report.format_table(f"[{section}] {variant} B={batch}", rows[-2:]))
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


def run_cuda(runner: Runner, s: Settings) -> Dict:
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available"}
    out = {"device_name": torch.cuda.get_device_name(), "inference": [], "training": []}
    for autocast in (None, "bfloat16", "float16"):
        out["inference"] += run_pairs(runner, "inference", s, s.inference_size, s.batches,
                                      False, "cuda", autocast)
        out["training"] += run_pairs(runner, "training", s, s.train_size, (s.train_batch,),
                                     True, "cuda", autocast)
    out["ratios"] = report.ratios(out["inference"] + out["training"])
    return out


def _meta(args: argparse.Namespace, s: Settings) -> Dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "settings": s.__dict__, "threads": args.threads, "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "ours": "DABDETR.forward_predictions(images, with_aux=False) (the inference path); "
                "training: DABDETR(batched_inputs) losses summed, backward",
        "transformers_model": "DabDetrForObjectDetection(pixel_values, pixel_mask), timm "
                              "ResNet; training: labels given, .loss backward, dropout 0, "
                              "auxiliary_loss, stem and layer1 frozen as ours",
        "memory_method": "CPU: fresh process per case, peak RSS (VmHWM after clear_refs) "
                         "minus RSS after building model and inputs, malloc mmap threshold "
                         "64 KiB; CUDA: max_memory_allocated minus allocated before the step",
        "timing_method": "wall clock per step, implementations interleaved (ABBA)",
    }


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results.json"))
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "scaling.png"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-jobs", type=int, default=2,
                        help="memory measurements run at a time (each in its own process)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    results = {"meta": _meta(args, s)}
    start_memory_server()  # while the weights are prepared
    with tempfile.TemporaryDirectory() as workdir:
        weights = {v: prepare_weights(v, workdir) for v in VARIANTS}
        progress("prepared the weights")
        runner = Runner(weights, args.threads)
        results["inference"] = run_pairs(runner, "inference", s, s.inference_size,
                                         s.batches, False)
        results["training"] = run_pairs(runner, "training", s, s.train_size,
                                        (s.train_batch,), True)
        runner.release(keep=["R50"])
        results["scaling_size"], results["scaling_queries"] = run_scaling(runner, s)
        runner.release()
        cpu_rows = [r for k in SECTIONS for r in results[k]]
        progress(f"measuring the peak memory of {len({r['case'] for r in cpu_rows})} cases, "
                 f"{args.memory_jobs} at a time")
        runner.fill_memory(cpu_rows, args.memory_jobs)
        results["cuda"] = run_cuda(runner, s)
    for row in cpu_rows + results["cuda"].get("inference", []) + results["cuda"].get(
            "training", []):
        del row["case"]  # not JSON: its fields are the row's
    results["ratios"] = report.ratios(results["inference"] + results["training"]
                                      + results["scaling_size"])
    results["goals"] = report.goals(results["ratios"])
    results["meta"]["load_average_end"] = os.getloadavg()
    _write(results, args, s)
    return results


def _write(results: Dict, args: argparse.Namespace, s: Settings) -> None:
    tables = [("inference (CPU)", results["inference"]), ("training step (CPU)",
              results["training"]), ("scaling: short side (CPU)", results["scaling_size"]),
              ("scaling: queries (CPU)", results["scaling_queries"])]
    cuda = results["cuda"]
    if "skipped" in cuda:
        tables.append((f"CUDA: skipped ({cuda['skipped']})", []))
    else:
        tables += [(f"inference ({cuda['device_name']})", cuda["inference"]),
                   (f"training step ({cuda['device_name']})", cuda["training"])]
    print()
    for title, rows in tables:
        print(report.format_table(title, rows) if rows else title, end="\n\n")
    print(report.format_ratios(results["ratios"]), end="\n\n")
    print(report.format_goals(results["goals"]))
    for path in (args.output, args.plot):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    # imported here: the memory-measuring processes re-import this module, and need no plot
    from benchmarks.plot import plot_scaling

    title = f"DAB-DETR on CPU (threads: {args.threads}){', quick' if args.quick else ''}"
    plot_scaling(results["scaling_size"], results["scaling_queries"], args.plot, title)
    print(f"\nwrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
