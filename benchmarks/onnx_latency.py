"""CPU latency of an exported model in onnxruntime beside the same model in PyTorch.

    python benchmarks/onnx_latency.py [--config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml]
                                      [--size 800 1216] [--batch 1] [--warmup 2] [--repeats 5]
                                      [--threads N] [--onnx existing.onnx] [--opts KEY VALUE ...]

The model is the config's with random weights (MODEL.WEIGHTS "", seed 0), exported by
``dab_detr.export`` (unless ``--onnx`` names a file exported from the same config and weights:
the outputs are compared first). Both run the graph the file holds: ``ExportableDetector``
(padding mask, backbone, transformer, top-k) on one batch of ``--size`` images, PyTorch under
``torch.inference_mode`` with ``--threads`` intra-op threads, onnxruntime's CPU provider with as
many (its default graph optimisations). The two alternate within each round
(``measure.time_interleaved``), so that a busy machine slows both alike; the median and
quartiles of ``--repeats`` timed rounds after ``--warmup`` are printed, in milliseconds, with
the CPU model and the thread counts.
"""

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.measure import time_interleaved  # noqa: E402
from dab_detr.config import get_dab_detr_cfg  # noqa: E402
from dab_detr.export import ExportableDetector, export_onnx, require  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "dab_detr_R_50_50ep.yaml")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "unknown CPU")


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--onnx", default="", help="an exported file (default: export now)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = _parse(argv)
    ort = require("onnxruntime")
    from detectron2.modeling import build_model  # after dab_detr, which prepares its import

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = get_dab_detr_cfg(args.config_file,
                           ["MODEL.WEIGHTS", "", *args.opts, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    wrapper = ExportableDetector(model)
    h, w = args.size
    images = torch.randn(args.batch, 3, h, w)
    sizes = torch.tensor([[h, w]] * args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if not path:
            path = os.path.join(tmp, "model.onnx")
            start = time.perf_counter()
            export_onnx(model, path, (h, w))
            print(f"exported in {time.perf_counter() - start:.0f} s")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy(), "image_sizes": sizes.numpy()}

        with torch.inference_mode():
            expected = wrapper(images, sizes)
            got = session.run(None, feed)
            diff = float((torch.from_numpy(got[0]) - expected[0]).abs().max())
            print(f"max |score difference| onnxruntime - PyTorch: {diff:.2g}")
            steps = [lambda: wrapper(images, sizes), lambda: session.run(None, feed)]
            pytorch, onnxrt = time_interleaved(steps, "cpu", args.warmup, args.repeats)

    print(f"{os.path.relpath(args.config_file, REPO)}, random weights, {h}x{w}, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.repeats} timed rounds")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"threads: PyTorch {torch.get_num_threads()} intra-op; onnxruntime "
          f"{args.threads} intra-op, 1 inter-op (onnxruntime {ort.__version__}, "
          f"torch {torch.__version__})")
    for name, t in (("PyTorch", pytorch), ("onnxruntime", onnxrt)):
        print(f"  {name:12s} median {t['median']:8.1f} ms  (q1 {t['q1']:.1f}, q3 "
              f"{t['q3']:.1f}, min {t['min']:.1f}, max {t['max']:.1f})")
    print(f"  onnxruntime / PyTorch: {onnxrt['median'] / pytorch['median']:.2f}x")


if __name__ == "__main__":
    main()
