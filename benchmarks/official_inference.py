"""DAB-Deformable-DETR R50's CPU inference, side by side: the official model
(IDEA-Research/DAB-DETR, pure PyTorch) and this project's with each CPU deformable attention
(``MODEL.DAB_DETR.DEFORMABLE_ATTENTION`` ``light`` and ``pytorch``), on the same weights, in
one process, in interleaved rounds (official, light, pytorch, official, ...).

Needs a checkout of https://github.com/IDEA-Research/DAB-DETR (measured at 723ddb8), not
installed and not compiled (its model code imports scipy and Pillow, both already needed
here): its ``MultiScaleDeformableAttention`` extension is never built;
its attention is computed by its own pure-PyTorch ``ms_deform_attn_core_pytorch``
(``grid_sample``), which its op test holds equal to the CUDA kernel. Only its
``get_args_parser`` is taken from its ``main.py`` (for the defaults of
``-m dab_deformable_detr``), without importing the rest of ``main.py``.

    python benchmarks/official_inference.py /path/to/DAB-DETR --threads 1 --rounds 3
    python benchmarks/official_inference.py /path/to/DAB-DETR --weights official.pth

Weights: ``--weights``, a checkpoint in the official release format (``{"model": ...}``);
by default the official model's own (seeded) initialisation. Ours get them through
``dab_detr.checkpoint.convert`` (``--source official``) for the stock 80-class config; its
logits are compared with the official ones at the 80 COCO ids.
Input: ``(1, 3, H, W)`` seeded normalised pixels, no padding, float32, eval mode, no grad.
Times: each model's forward, without post-processing; median (min-max) of the timed rounds.
"""

import argparse
import ast
import os
import statistics
import sys
import time
import types
from typing import Callable, Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dab_detr  # noqa: E402, F401  before Detectron2: registers the models
from dab_detr.checkpoint import coco_class_rows, convert  # noqa: E402
from dab_detr.config import get_dab_detr_cfg  # noqa: E402
from dab_detr.layers import MSDeformAttn  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "dab_deformable_detr_R_50_50ep.yaml")
IMPLEMENTATIONS = ("light", "pytorch")


def official_model(checkout: str, seed: int) -> torch.nn.Module:
    """The official DAB-Deformable-DETR R50 (``main.py -m dab_deformable_detr`` defaults),
    seeded initialisation, its deformable attention in pure PyTorch."""
    sys.path.insert(0, checkout)
    # the compiled op's module, imported by the official code but never called here
    sys.modules.setdefault("MultiScaleDeformableAttention",
                           types.ModuleType("MultiScaleDeformableAttention"))
    from models.dab_deformable_detr import backbone, dab_deformable_detr
    from models.dab_deformable_detr.ops.functions.ms_deform_attn_func import (
        ms_deform_attn_core_pytorch,
    )
    from models.dab_deformable_detr.ops.modules import ms_deform_attn

    class PurePytorch:
        @staticmethod
        def apply(value, shapes, level_start, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PurePytorch
    backbone.is_main_process = lambda: False  # no ImageNet download: the weights are ours
    # main.py's argument parser alone (main.py imports the datasets and the training code)
    with open(os.path.join(checkout, "main.py")) as f:
        tree = ast.parse(f.read())
    parser_def = [n for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser"]
    namespace = {"argparse": argparse}
    exec(compile(ast.Module(parser_def, []), "main.py", "exec"), namespace)
    args = namespace["get_args_parser"]().parse_args(
        ["-m", "dab_deformable_detr", "--device", "cpu", "--coco_path", "unused"])
    torch.manual_seed(seed)
    model, _, _ = dab_deformable_detr.build_dab_deformable_detr(args)
    return model.eval()


def our_model(official_sd: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """This project's model (the stock config) with the converted official weights."""
    from detectron2.modeling import build_model

    cfg = get_dab_detr_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(convert("official", {"model": official_sd}, cfg),
                                                strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (
        missing, unexpected)
    return model


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", help="a checkout of IDEA-Research/DAB-DETR")
    parser.add_argument("--weights", default="",
                        help="official-format checkpoint (default: the official initialisation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from detectron2.structures import ImageList

    # ours first: the checkout's top-level packages (models, util) go first on sys.path
    official = official_model(os.path.abspath(args.official), args.seed)
    if args.weights:
        sd = torch.load(args.weights, map_location="cpu", weights_only=True)["model"]
        official.load_state_dict(sd)
    ours = our_model({k: v.detach().clone() for k, v in official.state_dict().items()})
    from util.misc import NestedTensor  # the checkout's

    g = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(1, 3, *args.size, generator=g)
    samples = NestedTensor(pixels, torch.zeros(1, *args.size, dtype=torch.bool))
    images = ImageList(pixels, [tuple(args.size)])

    def ours_with(name: str) -> Callable[[], dict]:
        def run() -> dict:
            for m in ours.modules():
                if isinstance(m, MSDeformAttn):
                    m.implementation = name
            return ours.forward_predictions(images, with_aux=False)
        return run

    steps = {"official": lambda: official(samples),
             **{name: ours_with(name) for name in IMPLEMENTATIONS}}
    print(f"load average before: {os.getloadavg()}", flush=True)
    times: Dict[str, List[float]] = {k: [] for k in steps}
    outputs = {}
    with torch.no_grad():
        for r in range(1 + args.rounds):  # round 0: the warm-up
            for name, step in steps.items():
                start = time.perf_counter()
                out = step()
                seconds = time.perf_counter() - start
                if r == 0:
                    outputs[name] = out["pred_logits"], out["pred_boxes"]
                else:
                    times[name].append(seconds)
                print(f"round {r}{' (warm-up)' if r == 0 else ''} {name}: {seconds:.2f} s",
                      flush=True)
    print(f"load average after: {os.getloadavg()}")
    reference = statistics.median(times["official"])
    for name, t in times.items():
        median = statistics.median(t)
        # the same round's official time: under a changing load, a steadier comparison
        paired = [a / b for a, b in zip(t, times["official"])]
        print(f"{name}: {median:.2f} s ({min(t):.2f}-{max(t):.2f}), "
              f"{median / reference:.2f} of the official time (per round: median "
              f"{statistics.median(paired):.2f}, {min(paired):.2f}-{max(paired):.2f})")
    rows = torch.as_tensor(coco_class_rows())  # the official logits' 80 COCO ids
    logits, boxes = outputs["official"]
    for name in IMPLEMENTATIONS:
        print(f"{name} against official: logits max abs diff "
              f"{(outputs[name][0] - logits[..., rows]).abs().max():.2e} (|logit| up to "
              f"{logits.abs().max():.1f}), boxes {(outputs[name][1] - boxes).abs().max():.2e}")


if __name__ == "__main__":
    main()
