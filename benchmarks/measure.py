"""Timing and peak memory of benchmark cases.

Latency: wall clock of each step after warm-up, the implementations interleaved within a
round (A B, then B A, ...), so that a noisy machine slows both alike.

Peak memory on CPU: each measurement runs in a fresh process (forked from a server that
has only imported the libraries). It builds the model and inputs, runs one step to warm up,
reads its resident set size, resets the kernel's high-water mark (``/proc/self/clear_refs``),
runs one more step and reports the high-water mark minus that baseline. glibc's malloc is
told to map every block of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so that
freed tensors leave the resident set at once. This counts all memory the step touches
(tensors, oneDNN buffers, allocator slack), not only tensors. On CUDA:
``torch.cuda.max_memory_allocated`` in process.
"""

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from .cases import Case, build_step

_MMAP_THRESHOLD = 65536
_context = None


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and quartiles in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    if len(ms) > 1:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median": statistics.median(ms), "min": ms[0], "max": ms[-1], "q1": q1, "q3": q3,
            "repeats": len(ms)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: Sequence[Callable[[], None]], device: str, warmup: int, repeats: int
) -> List[Dict[str, float]]:
    """Latency of each step, run in rounds that alternate their order (A B, B A, ...).

    Returns:
        per step, ``summarize`` of its ``repeats`` timed calls after ``warmup`` untimed ones.
    """
    times: List[List[float]] = [[] for _ in steps]
    for r in range(warmup + repeats):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            _sync(device)
            start = time.perf_counter()
            steps[i]()
            _sync(device)
            if r >= warmup:
                times[i].append(time.perf_counter() - start)
    return [summarize(t) for t in times]


def status_mib(key: str) -> float:
    """A ``VmRSS`` / ``VmHWM`` line of ``/proc/self/status``, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _child(case: Case, threads: int, conn) -> None:
    try:
        torch.set_num_threads(threads)
        step = build_step(case)
        step()  # warm-up: pages in lazily loaded weights, one-time buffers of the libraries
        gc.collect()
        baseline = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := current resident set
        step()
        conn.send({"peak_mib": status_mib("VmHWM") - baseline, "baseline_mib": baseline})
    except BaseException as e:  # reported by the parent, with the case
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _forkserver():
    """A forkserver context whose server has imported torch, detectron2, timm and
    transformers' model, so that each measurement starts at once, in a fresh process."""
    global _context
    if _context is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)  # read at server start
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([
            "torch", "dab_detr", "detectron2.modeling", "timm", "transformers",
            "transformers.models.dab_detr.modeling_dab_detr", "benchmarks.cases",
        ])
    return _context


def start_memory_server() -> None:
    """Start the forkserver now (its imports take seconds), before anything is timed."""
    _forkserver()
    multiprocessing.forkserver.ensure_running()


def peak_memory_cpu(case: Case, threads: int) -> Dict[str, float]:
    """Peak resident memory of one step of ``case`` above the built model, in a fresh
    process; ``{"peak_mib", "baseline_mib"}``, or ``{"error"}`` if the step failed."""
    ctx = _forkserver()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, threads, send))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the measuring process died (out of memory?)"}
    proc.join()
    return result


def peak_memory_cuda(run: Callable[[], None]) -> Dict[str, float]:
    """Peak CUDA memory allocated by ``run`` (built model and inputs excluded), in MiB."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return {"peak_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20,
            "baseline_mib": baseline / 2**20}
