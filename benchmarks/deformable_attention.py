"""Multi-scale deformable attention's implementations side by side (MODEL.DAB_DETR.
DEFORMABLE_ATTENTION): the boundary ``multi_scale_deformable_attention``'s forward and
forward + backward, time and peak memory, at encoder scale (batch 2, an 800 x 1333 image's 4
levels, every token a query) and decoder scale (300 queries, the same levels); and with
``--model``, DAB-Deformable-DETR R50's training step (512 x 768, batch 2) and inference
(800 x 1216, batch 1) with each CPU implementation.

    python benchmarks/deformable_attention.py --threads 2            # CPU, float32
    python benchmarks/deformable_attention.py --threads 2 --model    # and the model
    python benchmarks/deformable_attention.py --device cuda --dtypes float32 bfloat16

On CUDA: ``pytorch``, ``light``, ``triton`` and, when it is installed, the official compiled
op (Deformable DETR's ``MultiScaleDeformableAttention`` extension); peak memory is
``torch.cuda.max_memory_allocated``. On CPU: ``pytorch`` and ``light``; peak memory is the
resident set's high-water mark of a fresh process (``benchmarks/measure.py``'s method). Times
are medians of interleaved rounds (A B, B A, ...), so that a busy machine slows all alike.

Shapes: B batch, Q queries, h heads, d channels per head, L levels, P points, S tokens.
"""

import argparse
import gc
import math
import multiprocessing
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import peak_memory_cuda, status_mib, time_interleaved  # noqa: E402
from dab_detr.layers.ms_deform_attn import (  # noqa: E402
    multi_scale_deformable_attention,
    resolve_implementation,
)

BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4  # the R50 models': C = 256 = 8 x 32
SCALES = {"encoder": None, "decoder": 300}  # queries: every token, or 300
IMAGE = (800, 1333)  # the boundary's default input size (--image)


def level_shapes(height: int, width: int) -> List[Tuple[int, int]]:
    """``(H_l, W_l)`` of strides 8, 16, 32 (ResNet res3-res5) and 64 (the extra level)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32, 64)]


def make_inputs(scale: str, dtype: torch.dtype, device: str,
                image: Tuple[int, int] = IMAGE) -> Tuple:
    """value ``(B, S, h, d)`` in ``dtype``; float32 locations ``(B, Q, h, L, P, 2)`` and
    weights ``(B, Q, h, L, P)``. Encoder queries sample near their own token (a few pixels
    away, as the trained model's offsets), decoder queries anywhere; the levels are those of
    an ``image`` (H, W)."""
    g = torch.Generator().manual_seed(0)
    shapes = level_shapes(*image)
    s, n_levels = sum(hl * wl for hl, wl in shapes), len(shapes)
    q = SCALES[scale] or s
    value = torch.randn(BATCH, s, HEADS, CHANNELS, generator=g)
    if SCALES[scale] is None:
        # (S, 2) token centres, normalised in their own level
        centres = torch.cat([torch.stack(torch.meshgrid(
            (torch.arange(wl) + 0.5) / wl, (torch.arange(hl) + 0.5) / hl, indexing="xy"), -1)
            .reshape(-1, 2) for hl, wl in shapes])
        centres = centres.expand(BATCH, -1, -1)
    else:
        centres = torch.rand(BATCH, q, 2, generator=g)
    # (L, 2) pixel sizes (1 / W_l, 1 / H_l): offsets of about 2 pixels in each level
    pixel = torch.tensor([[1 / wl, 1 / hl] for hl, wl in shapes])
    offsets = 2 * torch.randn(BATCH, q, HEADS, n_levels, POINTS, 2, generator=g)
    locations = centres[:, :, None, None, None, :] + offsets * pixel[:, None, :]
    logits = torch.randn(BATCH, q, HEADS, n_levels * POINTS, generator=g)
    weights = logits.softmax(-1).view(BATCH, q, HEADS, n_levels, POINTS)
    return (value.to(device, dtype), shapes, locations.to(device), weights.to(device))


class _OfficialOp(torch.autograd.Function):
    """Deformable DETR's compiled op (``MultiScaleDeformableAttention``), when installed."""

    @staticmethod
    def forward(ctx, value, shapes_t, starts_t, locations, weights):
        import MultiScaleDeformableAttention as msda

        ctx.save_for_backward(value, shapes_t, starts_t, locations, weights)
        return msda.ms_deform_attn_forward(value, shapes_t, starts_t, locations, weights, 64)

    @staticmethod
    def backward(ctx, grad_output):
        import MultiScaleDeformableAttention as msda

        value, shapes_t, starts_t, locations, weights = ctx.saved_tensors
        grads = msda.ms_deform_attn_backward(value, shapes_t, starts_t, locations, weights,
                                             grad_output.contiguous(), 64)
        return grads[0], None, None, grads[1], grads[2]


def official_available(device: str) -> bool:
    try:
        import MultiScaleDeformableAttention  # noqa: F401
    except ImportError:
        return False
    return device == "cuda"


def _official(value, shapes, locations, weights):
    sizes = [hl * wl for hl, wl in shapes]
    shapes_t = torch.tensor(shapes, dtype=torch.long, device=value.device)
    starts_t = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=value.device)
    # the op takes one dtype for all
    return _OfficialOp.apply(value, shapes_t, starts_t, locations.to(value.dtype),
                             weights.to(value.dtype))


def implementations(device: str, dtype: str) -> List[str]:
    """What runs on ``device`` with a ``dtype`` value (the official op: float32 only)."""
    names = ["pytorch", "light"]
    if device == "cuda" and resolve_implementation("auto", torch.zeros(1, device=device)) \
            == "triton":
        names.append("triton")
    if official_available(device) and dtype == "float32":
        names.append("official")
    return names


def make_step(name: str, inputs: Tuple, backward: bool) -> Callable[[], None]:
    """One call of the boundary (or the official op) on ``inputs``, with backward."""
    value, shapes, locations, weights = inputs
    leaves = [t.detach().requires_grad_(backward) for t in (value, locations, weights)]

    def step() -> None:
        with torch.set_grad_enabled(backward):
            if name == "official":
                out = _official(leaves[0], shapes, leaves[1], leaves[2])
            else:
                out = multi_scale_deformable_attention(leaves[0], shapes, leaves[1], leaves[2],
                                                       name)
            if backward:
                out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return step


def set_implementation(model: torch.nn.Module, name: str) -> None:
    """Every deformable attention of ``model`` computed by ``name``."""
    from dab_detr.layers import MSDeformAttn

    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.implementation = name


def model_case(train: bool):
    """DAB-Deformable-DETR R50 (random weights, seeded): its training step at 512 x 768,
    batch 2, or its inference at 800 x 1216, batch 1 (``benchmarks/cases.py``'s)."""
    from benchmarks.cases import Case

    size = (512, 768, 2) if train else (800, 1216, 1)
    return Case("ours", "Deformable-R50", train, *size)


def model_steps(names: List[str], train: bool) -> List[Callable[[], None]]:
    """One model, one step per implementation (switched before each call)."""
    from benchmarks.cases import build_model
    from benchmarks.cases import make_step as case_step

    case = model_case(train)
    model = build_model(case)
    step = case_step(case, model)

    def with_implementation(name: str) -> Callable[[], None]:
        def run() -> None:
            set_implementation(model, name)
            step()
        return run

    return [with_implementation(name) for name in names]


def _memory_child(spec: tuple, threads: int, conn) -> None:
    """Peak resident memory of one step above what was built (benchmarks/measure.py's
    method): ``spec`` is ``("boundary", name, scale, dtype, backward, image)`` or
    ``("model", name, train)``."""
    try:
        torch.set_num_threads(threads)
        if spec[0] == "boundary":
            _, name, scale, dtype, backward, image = spec
            inputs = make_inputs(scale, getattr(torch, dtype), "cpu", image)
            step = make_step(name, inputs, backward)
        else:
            step = model_steps([spec[1]], spec[2])[0]
        step()
        gc.collect()
        baseline = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := current resident set
        step()
        conn.send(status_mib("VmHWM") - baseline)
    except BaseException as e:  # reported by the parent
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


_context = None


def _forkserver():
    """A forkserver whose server has imported this module (torch, the package): each
    measurement then starts at once in a fresh process forked from it, with no thread pool
    of the parent's timing runs in it."""
    global _context
    if _context is None:
        # freed blocks of 64 KiB or more leave the resident set at once (read at server start)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["benchmarks.deformable_attention"])
    return _context


def peak_memory_cpu(spec: tuple, threads: int) -> float:
    """``_memory_child`` in a fresh process, in MiB."""
    from benchmarks import deformable_attention  # the child's function by its module's name

    ctx = _forkserver()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=deformable_attention._memory_child, args=(spec, threads, send))
    proc.start()
    send.close()
    result = receive.recv()
    proc.join()
    if isinstance(result, str):
        raise RuntimeError(f"{spec}: {result}")
    return result


def _row(label: str, times: List[Dict[str, float]], memory: List[float],
         names: List[str]) -> List[str]:
    """Table rows: each implementation's median time and peak memory, and their ratios to
    the first (the reference)."""
    rows = []
    for name, t, m in zip(names, times, memory):
        rows.append(f"| {label} | {name} | {t['median']:.1f} ms ({t['min']:.1f}-{t['max']:.1f}) "
                    f"| {m:.0f} MiB | {t['median'] / times[0]['median']:.2f} | "
                    f"{m / memory[0]:.2f} |")
    return rows


def boundary_rows(args: argparse.Namespace) -> List[str]:
    rows = []
    for dtype in args.dtypes:
        names = implementations(args.device, dtype)
        for scale in SCALES:
            inputs = make_inputs(scale, getattr(torch, dtype), args.device, tuple(args.image))
            for backward in (False, True):
                label = f"{scale}, {dtype}, {'forward + backward' if backward else 'forward'}"
                steps = [make_step(name, inputs, backward) for name in names]
                times = time_interleaved(steps, args.device, args.warmup, args.repeats)
                if args.device == "cuda":
                    memory = [peak_memory_cuda(step)["peak_mib"] for step in steps]
                else:
                    memory = [peak_memory_cpu(("boundary", name, scale, dtype, backward,
                                               tuple(args.image)), args.threads)
                              for name in names]
                rows += _row(label, times, memory, names)
                print("\n".join(rows[-len(names):]), flush=True)
            del inputs
    return rows


def model_rows(args: argparse.Namespace) -> List[str]:
    names = ["pytorch", "light"]
    rows = []
    for train in (True, False):
        case = model_case(train)
        label = (f"DAB-Deformable-DETR R50 {'training step' if train else 'inference'}, "
                 f"{case.height}x{case.width}, batch {case.batch}")
        times = time_interleaved(model_steps(names, train), "cpu", 1, args.model_repeats)
        memory = [peak_memory_cpu(("model", name, train), args.threads) for name in names]
        rows += _row(label, times, memory, names)
        print("\n".join(rows[-len(names):]), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", type=int, nargs=2, default=list(IMAGE), metavar=("H", "W"),
                        help="the image whose 4 levels the boundary attends (default: %(default)s)")
    parser.add_argument("--model", action="store_true",
                        help="also DAB-Deformable-DETR R50's training step and inference (CPU)")
    parser.add_argument("--model-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    versions = f"torch {torch.__version__}"
    if args.device == "cuda":
        import triton

        versions += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    print(f"{versions}, {args.threads} threads, value dtype as listed (locations and "
          "weights float32)")
    header = ["| case | implementation | time: median (min-max) | peak memory | time / "
              "reference | memory / reference |", "|---|---|---|---|---|---|"]
    rows = boundary_rows(args)
    if args.model:
        rows += model_rows(args)
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
