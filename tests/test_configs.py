"""Every config under ``configs/`` builds, trains one step on a batch where one image has no
instances, and infers; and the optimizer's parameter groups."""

import glob
import os
from typing import Dict, List

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import CONFIG_DIR, load_cfg
from dab_detr.engine.optimizer import build_optimizer

CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)


def test_configs_found():
    assert "Base-DAB-DETR.yaml" in CONFIGS
    assert "quick_schedules/dab_detr_R_18_shapes.yaml" in CONFIGS
    assert "COCO-Detection/dab_deformable_detr_R_50_two_stage_50ep.yaml" in CONFIGS
    assert "COCO-Detection/dab_deformable_detr_R_50_two_stage_official_50ep.yaml" in CONFIGS
    assert len(CONFIGS) >= 12


def _batch(num_classes: int) -> List[Dict]:
    """A 64 x 80 image with two boxes and a 72 x 64 image without instances."""
    g = torch.Generator().manual_seed(0)
    first = Instances((64, 80))
    first.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 78.0, 60.0]]))
    first.gt_classes = torch.tensor([0, num_classes - 1])
    empty = Instances((72, 64))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    return [
        {"image": torch.rand(3, 64, 80, generator=g) * 255, "instances": first},
        {"image": torch.rand(3, 72, 64, generator=g) * 255, "instances": empty,
         "height": 144, "width": 128},  # results rescaled to an original size twice as large
    ]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_and_infers(name):
    cfg = load_cfg(name)
    d = cfg.MODEL.DAB_DETR
    model = build_model(cfg)
    batch = _batch(d.NUM_CLASSES)

    model.train()
    losses = model(batch)
    expected_keys = {"loss_ce", "loss_bbox", "loss_giou"}
    suffixes = [str(i) for i in range(d.DEC_LAYERS - 1)]
    if cfg.MODEL.META_ARCHITECTURE == "DABDeformableDETR" and d.DEFORMABLE.TWO_STAGE:
        suffixes.append("enc")  # the encoder proposals' losses
    if cfg.MODEL.META_ARCHITECTURE == "DINO":
        suffixes.append("interm")  # the selected proposals' losses
    if d.DN.ENABLED:  # the denoising queries' losses, every layer
        suffixes += ["dn"] + [f"dn_{i}" for i in range(d.DEC_LAYERS - 1)]
    expected_keys |= {f"{k}_{s}" for k in list(expected_keys) for s in suffixes}
    assert set(losses) == expected_keys
    for k, v in losses.items():
        assert v.shape == () and torch.isfinite(v), k
    sum(losses.values()).backward()
    # every trainable tensor is in the loss's graph: DDP (find_unused_parameters=False) stops
    # at one that is not. (All-zero gradients are normal at the first step: the box heads'
    # last layers start at zero, and so do the first decoder layer's content queries.)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n

    model.eval()
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for inp, res in zip(batch, results):
        inst = res["instances"]
        h, w = inp.get("height", inp["image"].shape[1]), inp.get("width", inp["image"].shape[2])
        assert inst.image_size == (h, w)
        assert 0 < len(inst) <= d.NUM_SELECT
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        # top-k: sorted by score
        torch.testing.assert_close(inst.scores, inst.scores.sort(descending=True).values)
        assert inst.pred_classes.dtype == torch.int64
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < d.NUM_CLASSES)).all()


@pytest.mark.parametrize("name", ["COCO-Detection/dab_detr_R_50_50ep.yaml",
                                  "quick_schedules/dab_detr_R_18_shapes.yaml"])
def test_optimizer_param_groups(name):
    cfg = load_cfg(name)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    groups = optimizer.param_groups
    assert len(groups) == 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    backbone = {id(p) for n, p in trainable.items() if n.startswith("backbone.")}
    others = {id(p) for n, p in trainable.items() if not n.startswith("backbone.")}
    assert backbone and others
    ids = [[id(p) for p in g["params"]] for g in groups]
    # no parameter twice, in one group or across both
    assert len(ids[0]) + len(ids[1]) == len(set(ids[0]) | set(ids[1])) == len(trainable)
    assert {frozenset(i) for i in ids} == {frozenset(backbone), frozenset(others)}
    base = cfg.SOLVER.BASE_LR
    for g, i in zip(groups, ids):
        expected_lr = base * cfg.SOLVER.BACKBONE_MULTIPLIER if set(i) == backbone else base
        assert g["lr"] == expected_lr
        assert g["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY
        assert g["fused"] is True  # torch >= 2.4 has a fused AdamW on CPU
    # frozen parameters (stem and res2 with FREEZE_AT 2) are in no group
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not frozen & (set(ids[0]) | set(ids[1]))
    if cfg.MODEL.BACKBONE.FREEZE_AT >= 1:
        assert frozen


def test_dilated_basic_block_backbone_raises():
    """ResNet-18/34 blocks cannot be dilated: DC5 is refused rather than built as a
    stride-16 network without dilation."""
    cfg = load_cfg("quick_schedules/dab_detr_R_18_shapes.yaml", "MODEL.RESNETS.RES5_DILATION", "2")
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_model(cfg)


@pytest.mark.parametrize("iter_update", ["True", "False"])
def test_box_heads_that_would_get_no_gradient_are_refused(iter_update):
    # one box head per layer, only the last layer supervised: the earlier heads never learn
    cfg = load_cfg("COCO-Detection/dab_detr_R_50_50ep.yaml", "MODEL.DAB_DETR.AUX_LOSS", "False",
                   "MODEL.DAB_DETR.BBOX_EMBED_DIFF_EACH_LAYER", "True",
                   "MODEL.DAB_DETR.ITER_UPDATE", iter_update)
    with pytest.raises(ValueError, match="BBOX_EMBED_DIFF_EACH_LAYER True with "
                                         "MODEL.DAB_DETR.AUX_LOSS False"):
        build_model(cfg)
    # either alone trains every head
    for key in ("AUX_LOSS", "BBOX_EMBED_DIFF_EACH_LAYER"):
        cfg = load_cfg("COCO-Detection/dab_detr_R_50_50ep.yaml", "MODEL.DAB_DETR.AUX_LOSS", "False",
                       "MODEL.DAB_DETR.BBOX_EMBED_DIFF_EACH_LAYER", "True",
                       "MODEL.DAB_DETR.ITER_UPDATE", iter_update, f"MODEL.DAB_DETR.{key}",
                       str(key == "AUX_LOSS"))
        model = build_model(cfg)
        model.train()
        sum(model(_batch(cfg.MODEL.DAB_DETR.NUM_CLASSES)).values()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fused_adamw_makes_the_update_of_the_loop():
    # the shapes config trains unclipped; clipping on, the comparison covers it too
    cfg = load_cfg("quick_schedules/dab_detr_R_18_shapes.yaml",
                   "SOLVER.CLIP_GRADIENTS.ENABLED", "True")
    model = build_model(cfg)
    fused = build_optimizer(cfg, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    sum(model(_batch(cfg.MODEL.DAB_DETR.NUM_CLASSES)).values()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for _ in range(3):
        fused.step()
    after_fused = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(state)
    # the same class (full-model clipping included) with torch's per-tensor loop
    loop = type(fused)([{"params": g["params"], "lr": g["lr"]} for g in fused.param_groups],
                       lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                       fused=False, foreach=False)
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads):
        p.grad = g
    for _ in range(3):
        loop.step()
    moved = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), after_fused[n], rtol=0, atol=1e-6, msg=n)
        moved += int(not torch.equal(p.detach(), state[n]))
    assert moved > 100  # the steps did update the weights


@pytest.mark.parametrize("enabled", [True, False])
def test_full_model_clipping_switch(enabled):
    """CLIP_GRADIENTS.ENABLED: the norm of all gradients together is at most CLIP_VALUE when
    the optimizer steps; off, the gradients reach AdamW as computed."""
    cfg = load_cfg("quick_schedules/dab_detr_R_18_shapes.yaml",
                   "SOLVER.CLIP_GRADIENTS.ENABLED", str(enabled),
                   "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1")
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (type(optimizer) is torch.optim.AdamW) is not enabled
    sum(model(_batch(cfg.MODEL.DAB_DETR.NUM_CLASSES)).values()).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert norm > 1.0  # from scratch the norm is far above the clipping value
    optimizer.step()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if enabled:
        torch.testing.assert_close(after, torch.tensor(0.1), rtol=1e-4, atol=0)
    else:
        assert torch.equal(after, norm)
