"""``Runner``: builds each benchmarked model once, times cases together and measures their
peak memory, as rows (flat dicts: the case's fields, ``latency_ms``, ``images_per_s``,
``peak_mib``, ``baseline_mib``, ``error``; ``case`` until the results are written)."""

import gc
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.cases import (
    VARIANTS,
    Case,
    build_model,
    config_queries,
    make_step,
    model_key,
)
from benchmarks.measure import peak_memory_cpu, peak_memory_cuda, time_interleaved


class Runner:
    """Builds each model once, times cases together, and measures their memory."""

    def __init__(self, weights: Dict[str, Dict[str, str]], threads: int):
        self.weights = weights
        self.threads = threads
        self.models: Dict[tuple, torch.nn.Module] = {}

    def case(self, impl: str, variant: str, **kwargs) -> Case:
        # None: the config's random initialisation (no transformers weights to convert)
        weights = None if kwargs.get("num_queries") else self.weights.get(variant, {}).get(impl)
        return Case(impl=impl, variant=variant, weights=weights, **kwargs)

    def model(self, case: Case) -> torch.nn.Module:
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
            steps = [make_step(c, self.model(c)) for c in cases]
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
            "section": section, "impl": case.impl, "model": VARIANTS[case.variant].model,
            "variant": case.variant, "train": case.train, "device": case.device,
            "dtype": case.autocast or "float32",
            "height": case.height, "width": case.width, "short_side": case.height,
            "batch": case.batch,
            "num_queries": case.num_queries or config_queries(case.variant),
            "latency_ms": latency,
            "images_per_s": case.batch * 1000 / median if median else None,
            "peak_mib": peak.get("peak_mib"), "baseline_mib": peak.get("baseline_mib"),
            "error": error or peak.get("error"), "case": case,
        }

    def release(self, keep: Sequence[str] = ()) -> None:
        """Free the built models except those of the ``keep`` variants."""
        self.models = {k: m for k, m in self.models.items() if k[1] in keep and not k[3]}
        gc.collect()
