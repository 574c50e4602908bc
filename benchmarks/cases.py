"""What the benchmark runs: this project's DAB-DETR, DETR and Conditional DETR and transformers'
``DabDetrForObjectDetection``, ``DetrForObjectDetection`` and
``ConditionalDetrForObjectDetection`` on the same weights, and this project's DAB-Deformable-DETR
and DINO (which have no transformers counterpart), as one-call steps (a forward pass, or a
training step: forward, loss, backward; DINO's with its contrastive denoising queries).

Equal weights the way ``tests/test_equivalence_transformers.py`` gets them: a random
transformers model (its timm ResNet built offline, no pretrained download) is saved with
``save_pretrained``, converted with ``dab_detr.convert`` and loaded strictly into ours.
DAB-Deformable-DETR and DINO get their config's random initialisation (seeded: the same
weights in every process that builds it).

Shapes: B batch, H x W input size (no padding: every image of a batch has that size).
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import dab_detr  # noqa: F401  before Detectron2: prepares its import, registers the models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Variant:
    """One benchmarked model.

    Attributes:
        model: the model family (``--models``): one of :data:`MODELS`.
        config: ours, under ``configs/``.
        transformers: ``<hf>Config`` arguments of the same model; None: transformers has
            no counterpart, only ours is measured.
        hf: transformers' name of the model: ``<hf>Config``, ``<hf>ForObjectDetection``.
    """

    model: str
    config: str
    transformers: Optional[dict]
    hf: str = "DabDetr"


VARIANTS: Dict[str, Variant] = {
    "R50": Variant("dab_detr", "COCO-Detection/dab_detr_R_50_50ep.yaml", {}),
    "R50-DC5": Variant(
        "dab_detr", "COCO-Detection/dab_detr_R_50_DC5_50ep.yaml",
        dict(dilation=True, temperature_height=10, temperature_width=10),
    ),
    "Deformable-R50": Variant(
        "dab_deformable_detr", "COCO-Detection/dab_deformable_detr_R_50_50ep.yaml", None
    ),
    "DETR-R50": Variant("detr", "COCO-Detection/detr_R_50_500ep.yaml", {}, "Detr"),
    "Conditional-R50": Variant(
        "conditional_detr", "COCO-Detection/conditional_detr_R_50_50ep.yaml", {},
        "ConditionalDetr",
    ),
    # DINO-4scale: 900 queries selected from the encoder's proposals
    "DINO-R50": Variant("dino", "COCO-Detection/dino_R_50_4scale_12ep.yaml", None),
}
MODELS = ("dab_detr", "dab_deformable_detr", "detr", "conditional_detr", "dino")
# the models whose transformer is deformable: the attention-share section measures them
DEFORMABLE_MODELS = ("dab_deformable_detr", "dino")
IMPLS = ("ours", "transformers")
NUM_QUERIES = 300  # of the DAB-DETR configs, and DabDetrConfig's default
NUM_BOXES = 5  # ground-truth boxes per image in training steps


@dataclass(frozen=True)
class Case:
    """One measured configuration (picklable: memory is measured in a child process).

    Attributes:
        impl: "ours" or "transformers".
        variant: a key of ``VARIANTS``.
        train: a training step (forward, loss, backward) instead of a forward pass.
        height, width, batch: input size H x W and batch B.
        weights: ours: a converted checkpoint; transformers: a ``save_pretrained`` folder;
            None (ours only): the config's random initialisation, seeded.
        num_queries: ours only: overrides the config's NUM_QUERIES.
        device: "cpu" or "cuda".
        autocast: "bfloat16" or "float16" to run under ``torch.autocast``; None: float32.
    """

    impl: str
    variant: str
    train: bool
    height: int
    width: int
    batch: int
    weights: Optional[str] = None
    num_queries: Optional[int] = None
    device: str = "cpu"
    autocast: Optional[str] = None


def impls(variant: str) -> Tuple[str, ...]:
    """The implementations measured for ``variant``: ours, and transformers' if it has one."""
    return IMPLS if VARIANTS[variant].transformers is not None else IMPLS[:1]


def _cfg(variant: str, opts: List[str]):
    from dab_detr.config import get_dab_detr_cfg

    path = os.path.join(REPO, "configs", VARIANTS[variant].config)
    return get_dab_detr_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])


def config_queries(variant: str) -> int:
    """The number of queries of ``variant``'s config (DETR: 100, DINO: 900, the others:
    300)."""
    return _cfg(variant, []).MODEL.DAB_DETR.NUM_QUERIES


def prepare_weights(variant: str, workdir: str, seed: int = 0) -> Dict[str, str]:
    """Random transformers weights for ``variant`` (one with a transformers counterpart),
    saved and converted for ours.

    Returns:
        ``{"transformers": save_pretrained folder, "ours": converted checkpoint}``.
    """
    import transformers

    from dab_detr.checkpoint import convert

    torch.manual_seed(seed)
    v = VARIANTS[variant]
    # dropout as ours (MODEL.DAB_DETR.DROPOUT: 0 for DAB-DETR, 0.1 for the baselines), where
    # the official code has it: on the residuals, the attention weights and the FFN's hidden
    # layer (transformers' attention_dropout and activation_dropout default to 0); auxiliary
    # losses as ours (AUX_LOSS)
    dropout = _cfg(variant, []).MODEL.DAB_DETR.DROPOUT
    config = getattr(transformers, f"{v.hf}Config")(
        num_labels=91, dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
        auxiliary_loss=True, **v.transformers,
    )
    hf_dir = os.path.join(workdir, f"{variant}-transformers")
    getattr(transformers, f"{v.hf}ForObjectDetection")(config).save_pretrained(hf_dir)
    ours = os.path.join(workdir, f"{variant}-ours.pth")
    # loaded strictly by _build_ours, which checks it against the config
    torch.save({"model": convert("transformers", hf_dir)}, ours)
    return {"transformers": hf_dir, "ours": ours}


def _build_ours(case: Case) -> torch.nn.Module:
    from detectron2.modeling import build_model

    opts = [] if case.num_queries is None else ["MODEL.DAB_DETR.NUM_QUERIES",
                                                str(case.num_queries)]
    torch.manual_seed(0)  # random initialisation: the same in every process
    model = build_model(_cfg(case.variant, opts))
    if case.weights is not None:
        model.load_state_dict(torch.load(case.weights, weights_only=True)["model"], strict=True)
    return model


def _build_transformers(case: Case) -> torch.nn.Module:
    import transformers

    model_class = getattr(transformers, f"{VARIANTS[case.variant].hf}ForObjectDetection")
    model = model_class.from_pretrained(case.weights)
    # ours trains neither the stem nor res2 (FREEZE_AT 2, as DETR and DAB-DETR do);
    # transformers trains the whole ResNet unless told: freeze the same layers (the same
    # work and memory as ours; its frozen BatchNorms are frozen either way)
    for name, p in model.model.backbone.named_parameters():
        if not any(f"layer{i}" in name for i in (2, 3, 4)):
            p.requires_grad_(False)
    return model


def _targets(case: Case, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, NUM_BOXES)`` classes in [0, 80) and ``(B, NUM_BOXES, 4)`` cxcywh boxes."""
    classes = torch.randint(0, 80, (case.batch, NUM_BOXES), generator=g)
    centres = torch.rand(case.batch, NUM_BOXES, 2, generator=g) * 0.5 + 0.25
    sizes = torch.rand(case.batch, NUM_BOXES, 2, generator=g) * 0.3 + 0.1
    return classes, torch.cat([centres, sizes], -1)


def _ours_step(case: Case, model: torch.nn.Module, pixels: torch.Tensor,
               targets: Tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    from detectron2.structures import Boxes, ImageList, Instances
    from torchvision.ops import box_convert

    if not case.train:
        images = ImageList(pixels, [(case.height, case.width)] * case.batch)
        # what forward() runs at inference, before its top-k post-processing
        return lambda: model.forward_predictions(images, with_aux=False)
    # the training path takes 0-255 images and XYXY pixel boxes; it normalises itself
    std, mean = model.pixel_std, model.pixel_mean
    scale = torch.tensor([case.width, case.height] * 2, dtype=torch.float)
    batch = []
    for img, classes, boxes in zip(pixels * std + mean, *targets):
        inst = Instances((case.height, case.width))
        inst.gt_boxes = Boxes(box_convert(boxes, "cxcywh", "xyxy") * scale)
        inst.gt_classes = classes
        batch.append({"image": img, "instances": inst.to(case.device)})
    return lambda: sum(model(batch).values()).backward()


def _transformers_step(case: Case, model: torch.nn.Module, pixels: torch.Tensor,
                       targets: Tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    from dab_detr.checkpoint import coco_class_rows

    mask = torch.ones(case.batch, case.height, case.width, dtype=torch.long,
                      device=case.device)
    if not case.train:
        return lambda: model(pixel_values=pixels, pixel_mask=mask)
    rows = torch.as_tensor(coco_class_rows())  # its 91 classes are indexed by COCO id
    labels = [{"class_labels": rows[c].to(case.device), "boxes": b.to(case.device)}
              for c, b in zip(*targets)]
    return lambda: model(pixel_values=pixels, pixel_mask=mask, labels=labels).loss.backward()


def model_key(case: Case) -> tuple:
    """Cases with equal keys can share one built model."""
    return (case.impl, case.variant, case.weights, case.num_queries, case.device)


def build_model(case: Case) -> torch.nn.Module:
    model = (_build_ours if case.impl == "ours" else _build_transformers)(case)
    return model.to(case.device)


def make_step(case: Case, model: torch.nn.Module) -> Callable[[], None]:
    """``case``'s inputs, and a function that runs one step of ``model`` on them and frees
    what it made (outputs, gradients): every call does the same work from the same state."""
    g = torch.Generator().manual_seed(0)
    # normalised pixels: both models see the same (B, 3, H, W) input
    pixels = torch.randn(case.batch, 3, case.height, case.width, generator=g).to(case.device)
    targets = _targets(case, g)
    make = _ours_step if case.impl == "ours" else _transformers_step
    step = make(case, model, pixels, targets)
    dtype = getattr(torch, case.autocast) if case.autocast else None

    def run() -> None:
        model.train(case.train)  # the model may be shared with cases of the other mode
        with torch.set_grad_enabled(case.train), torch.autocast(
            case.device, dtype=dtype, enabled=dtype is not None
        ):
            step()
        model.zero_grad(set_to_none=True)

    return run


def build_step(case: Case) -> Callable[[], None]:
    """A fresh model and ``make_step`` of it."""
    return make_step(case, build_model(case))
