"""``SOLVER.AMP.ENABLED``: training steps under autocast (``dab_detr/engine/amp.py``).

On CPU, every family's small shapes model takes a bfloat16 step through the trainer that
``SOLVER.AMP.ENABLED`` builds, and a float16 step with its loss scaling. The same on CUDA is
marked ``cuda`` (``pytest -m cuda``, run by ``benchmarks/gpu_check.sh``).
"""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import train_net
from conftest import CONFIG_DIR, SMALL, small_cfg
from dab_detr.config import get_dab_detr_cfg
from dab_detr.data import register_builtin_datasets
from dab_detr.engine import Trainer, build_optimizer
from dab_detr.engine.amp import AutocastTrainer
from dab_detr.layers.box_ops import refine_boxes

# every family's small config (a new family's shapes config joins by its name)
FAMILIES = sorted(glob.glob(os.path.join(CONFIG_DIR, "quick_schedules", "*_shapes.yaml")))
FAMILY_IDS = [os.path.basename(f)[: -len("_shapes.yaml")] for f in FAMILIES]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def family_cfg(config_file: str, *opts: str):
    return get_dab_detr_cfg(config_file, ["MODEL.WEIGHTS", "", *SMALL, *opts])


def batch(device: str = "cpu"):
    """Two 96 x 128 images (0-255), three boxes and none."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 0):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        wh = 10 + torch.rand(n, 2, generator=g) * 30
        inst = Instances((96, 128))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 5, (n,), generator=g)
        image = torch.randint(0, 256, (3, 96, 128), generator=g).float()
        out.append({"image": image.to(device), "instances": inst.to(device)})
    return out


def amp_step(cfg, precision: torch.dtype, device: str = "cpu", init_scale: float = 2.0**16):
    """One ``AutocastTrainer`` step of ``cfg``'s model (float16: the loss scaled by
    ``init_scale`` at first); ``(trainer, storage, weights before,
    dtypes seen: the transformer's linear layers' outputs (a set) and the criterion's
    logits)``."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {"network": set()}

    def network_dtype(module, inputs, output):
        seen["network"].add(output.dtype)

    for module in model.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(network_dtype)
    forward = model.criterion.forward

    def criterion(outputs, targets):
        seen["criterion"] = outputs["pred_logits"].dtype
        return forward(outputs, targets)

    model.criterion.forward = criterion
    data = batch(device)
    trainer = AutocastTrainer(model, iter(lambda: data, None), build_optimizer(cfg, model),
                              precision=precision)
    if precision == torch.float16:
        trainer.grad_scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
    return trainer, storage, before, seen


def assert_trained(trainer, storage, before):
    losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    moved = [n for n, p in trainable if not torch.equal(p.detach(), before[n])]
    assert len(moved) > 0.9 * len(trainable)  # the step was taken (some grads are exact 0)


@pytest.mark.parametrize("config_file", FAMILIES, ids=FAMILY_IDS)
def test_bfloat16_step_of_every_family(config_file):
    """The network runs in bfloat16, the losses in float32; finite losses and gradients, and
    the optimizer steps (no loss scaling in bfloat16)."""
    trainer, storage, before, seen = amp_step(family_cfg(config_file), torch.bfloat16)
    # the linear layers ran in bfloat16 (the deformable attention's sampling offsets may be
    # float32), the losses in float32
    assert torch.bfloat16 in seen["network"] and seen["criterion"] == torch.float32
    assert not trainer.grad_scaler.is_enabled()
    assert_trained(trainer, storage, before)


def test_float16_step_scales_the_loss_and_unscales_before_clipping():
    """float16: the full-model clipping sees unscaled gradients: after the step their norm is
    SOLVER.CLIP_GRADIENTS.CLIP_VALUE, as a float32 step's (the scaled ones clipped, then
    unscaled by a fused AdamW, were 2 ** 10 times smaller). Started at a scale of 2 ** 10: at
    GradScaler's 2 ** 16 this model's first float16 gradients overflow, and that step is
    skipped, as the next test shows."""
    cfg = family_cfg(FAMILIES[FAMILY_IDS.index("dab_deformable_detr_R_18")])
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model"
    trainer, storage, before, seen = amp_step(cfg, torch.float16, init_scale=2.0**10)
    assert torch.float16 in seen["network"] and seen["criterion"] == torch.float32
    assert trainer.grad_scaler.is_enabled() and trainer.grad_scaler.get_scale() == 2.0**10
    assert_trained(trainer, storage, before)
    # the float32 gradients of the same step are above the clipping norm
    torch.manual_seed(0)
    model = build_model(cfg).train()
    sum(model(batch()).values()).backward()
    assert _grad_norm(model) > 10 * clip.CLIP_VALUE
    assert _grad_norm(trainer.model) == pytest.approx(clip.CLIP_VALUE, rel=1e-4)


def _grad_norm(model: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


def test_float16_step_with_an_inf_gradient_is_skipped_and_the_scale_lowered():
    """GradScaler's 2 ** 16 is too much for this model's first step: its float16 gradients
    overflow; the step is skipped (every weight as it was) and the scale halved."""
    cfg = family_cfg(FAMILIES[FAMILY_IDS.index("dab_deformable_detr_R_18")])
    trainer, storage, before, seen = amp_step(cfg, torch.float16)
    assert storage.history("total_loss").latest() > 0  # a finite loss: only gradients overflow
    assert not all(torch.isfinite(p.grad).all() for p in trainer.model.parameters()
                   if p.grad is not None)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert trainer.grad_scaler.get_scale() == 2.0**15


def test_trainer_builds_the_autocast_trainer_and_checkpoints_its_scale(tmp_path):
    """``SOLVER.AMP.ENABLED`` in train_net's ``Trainer`` (CPU here: train_net itself refuses
    AMP without CUDA): two iterations in float16, the scale saved with the trainer's state
    and restored by ``--resume``."""
    register_builtin_datasets()
    cfg = small_cfg("SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR",
                    str(tmp_path), "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer)
    assert trainer._trainer.precision == torch.float16
    # a scale that a new scaler (2 ** 16) would not have
    trainer._trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert saved["trainer"]["_trainer"]["grad_scaler"]["scale"] == 1024.0
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed._trainer.grad_scaler.get_scale() == 1024.0
    # a bfloat16 run saves no scale; a float16 run resumed from it starts a new one
    cfg.defrost()
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    bf16 = Trainer(cfg)
    assert bf16._trainer.precision == torch.bfloat16
    state = bf16.state_dict()
    assert state["_trainer"]["grad_scaler"] == {}
    resumed._trainer.load_state_dict(state["_trainer"])
    assert resumed._trainer.grad_scaler.get_scale() == 1024.0


def test_amp_precision_is_checked_with_the_key_named(tmp_path):
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, "quick_schedules", "dab_detr_R_18_shapes.yaml"),
         "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "fp8",
         "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='fp8'; expected one of "
                                         r"\['bfloat16', 'float16'\]"):
        train_net.load_config(args)


def test_refine_boxes_is_float32_under_autocast():
    reference = torch.rand(2, 5, 4) * 0.8 + 0.1
    delta = torch.randn(2, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refined = refine_boxes(reference, delta.bfloat16())
    assert refined.dtype == torch.float32
    # the float32 update of the bfloat16 delta: only the delta's own rounding
    torch.testing.assert_close(refined, refine_boxes(reference, delta.bfloat16().float()),
                               rtol=0, atol=0)
    assert refine_boxes(reference.double(), delta.double()).dtype == torch.float64


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config_file", FAMILIES, ids=FAMILY_IDS)
def test_cuda_autocast_step_of_every_family(config_file, precision):
    if precision == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    cfg = family_cfg(config_file, "MODEL.DEVICE", "cuda")
    trainer, storage, before, seen = amp_step(cfg, precision, "cuda")
    assert precision in seen["network"] and seen["criterion"] == torch.float32
    assert_trained(trainer, storage, before)
