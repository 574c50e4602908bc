"""Denoising training (DN-DETR) for both families and DINO's contrastive denoising: the
noise, the attention mask's three rules, padding, the independence of the matching queries,
the losses, and a DDP step in which a worker has no object (DINO's own noise and negatives:
test_dino.py). (The DN checkpoints' inference is in test_equivalence_official.py.)"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import SMALL, config_path
from dab_detr.checkpoint import DabDetrCheckpointer
from dab_detr.config import get_dab_detr_cfg
from dab_detr.modeling.denoising import denoising_attn_mask, make_denoising_queries

DAB = config_path("quick_schedules/dab_detr_R_18_shapes.yaml")
DEFORMABLE = config_path("quick_schedules/dab_deformable_detr_R_18_shapes.yaml")
DINO = config_path("quick_schedules/dino_R_18_shapes.yaml")
FAMILIES = {"dab_detr": DAB, "deformable": DEFORMABLE, "dino": DINO}
K = 5  # the shapes configs' classes


def _cfg(config: str, *opts: str):
    return get_dab_detr_cfg(config, ["MODEL.WEIGHTS", "", *SMALL, "MODEL.DAB_DETR.DN.ENABLED",
                                     "True", *opts])


def _targets(counts, generator=None):
    """Per image, ``counts[b]`` objects with random classes and boxes (cxcywh in [0.2, 0.8])."""
    g = generator or torch.Generator().manual_seed(0)
    return [{"labels": torch.randint(0, K, (n,), generator=g),
             "boxes": torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g),
                                 0.1 + 0.3 * torch.rand(n, 2, generator=g)], 1)}
            for n in counts]


def _batch(counts):
    """96 x 128 images with ``counts[b]`` boxes each."""
    g = torch.Generator().manual_seed(1)
    batch = []
    for n in counts:
        inst = Instances((96, 128))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 10 + 30 * torch.rand(n, 2, generator=g)], 1))
        inst.gt_classes = torch.randint(0, K, (n,), generator=g)
        batch.append({"image": torch.rand(3, 96, 128, generator=g) * 255, "instances": inst})
    return batch


def test_label_flips_happen_at_the_configured_rate():
    """With probability 0.2 a label is redrawn uniformly from K classes, so it changes with
    probability 0.2 * (1 - 1 / K) = 0.16; over 50,000 queries the standard error is 0.0016, and
    a bound of 0.008 fails rates of 0.2 or 0.12."""
    targets = _targets([1000] * 10)
    embed = nn.Embedding(K + 1, 7)
    captured = {}
    embed.register_forward_pre_hook(lambda module, args: captured.update(labels=args[0]))
    dn = make_denoising_queries(targets, embed, num_groups=5, label_noise=0.2, box_noise=0.4,
                                num_classes=K, num_matching=3,
                                generator=torch.Generator().manual_seed(0))
    noised = captured["labels"]
    assert noised.shape == dn.labels.shape == (50_000,)
    changed = (noised != dn.labels).float().mean().item()
    assert abs(changed - 0.2 * (1 - 1 / K)) < 0.008, changed
    assert noised.min() >= 0 and noised.max() < K  # never the "no object" row
    # the clean labels are the targets, group-major copies of the objects
    torch.testing.assert_close(dn.labels, torch.cat([t["labels"] for t in targets]).repeat(5))


def test_box_noise_stays_within_its_bounds_and_fills_them():
    targets = _targets([2000])
    dn = make_denoising_queries(targets, nn.Embedding(K + 1, 7), num_groups=4, label_noise=0.0,
                                box_noise=0.4, num_classes=K, num_matching=3,
                                generator=torch.Generator().manual_seed(0))
    clean = dn.boxes  # (G * N, 4)
    noised = dn.anchors[dn.batch_idx, dn.slot].sigmoid()
    assert ((noised >= 0) & (noised <= 1)).all()
    wh = clean[:, 2:]
    # relative moves: centres in [-0.4 / 2, 0.4 / 2] of (w, h), sizes in [-0.4, 0.4] of (w, h);
    # the anchors went through inverse_sigmoid's 1e-3 clamp, hence the tolerance
    centre = (noised[:, :2] - clean[:, :2]) / wh
    size = (noised[:, 2:] - clean[:, 2:]) / wh
    assert centre.abs().max() <= 0.2 + 1e-3 and size.abs().max() <= 0.4 + 1e-3
    assert centre.abs().max() > 0.19 and size.abs().max() > 0.38  # the whole range is used
    # without noise the anchors are the boxes
    exact = make_denoising_queries(targets, nn.Embedding(K + 1, 7), 2, 0.0, 0.0, K, 3)
    torch.testing.assert_close(exact.anchors[exact.batch_idx, exact.slot].sigmoid(),
                               exact.boxes)


def test_padding_slots_and_content():
    targets = _targets([3, 1, 0])
    embed = nn.Embedding(K + 1, 7)
    dn = make_denoising_queries(targets, embed, num_groups=2, label_noise=0.0, box_noise=0.0,
                                num_classes=K, num_matching=4)
    assert dn.pad_size == 6 and dn.content.shape == (3, 6, 8)
    real = torch.zeros(3, 6, dtype=torch.bool)
    real[dn.batch_idx, dn.slot] = True
    # image 0 fills both groups, image 1 one slot of each, image 2 none
    assert real.tolist() == [[True] * 6, [True, False, False, True, False, False], [False] * 6]
    assert (dn.content[~real] == 0).all() and (dn.anchors[~real] == 0).all()
    # real slots: the label's embedding and the indicator 1
    expected = torch.cat([embed(dn.labels), torch.ones(len(dn.labels), 1)], 1)
    torch.testing.assert_close(dn.content[dn.batch_idx, dn.slot], expected)
    # no query attends a padding slot, but the slot itself
    allowed = dn.attn_mask[:, 0]  # (B, T, T)
    for b in range(3):
        for c in range(6):
            if not real[b, c]:
                column = allowed[b, :, c].clone()
                assert column[c] and column.sum() == 1


def test_attention_mask_has_exactly_the_three_rules():
    allowed = denoising_attn_mask([2, 2], num_groups=3, num_matching=4,
                                  device=torch.device("cpu"))[0, 0]
    pad, total = 6, 10
    group = [r // 2 for r in range(pad)]
    for r in range(total):
        for c in range(total):
            if r >= pad:  # matching rows: matching columns only
                expected = c >= pad
            else:  # denoising rows: their own group and the matching columns
                expected = c >= pad or group[r] == group[c]
            assert bool(allowed[r, c]) == expected, (r, c)
    # no denoising queries at all: everything allowed
    assert denoising_attn_mask([0, 0], 3, 4, torch.device("cpu")).all()


def _dn_and_matching(model, batch, perturb_group=None):
    """``(dn logits (L, B, PAD, K), matching logits (L, B, NQ, K))`` of one training forward,
    the denoising content of ``perturb_group`` replaced by noise when given."""
    torch.manual_seed(0)  # the same denoising queries every call
    original = model.make_denoising

    def make(targets, num_matching):
        dn = original(targets, num_matching)
        if perturb_group is not None:
            single = dn.pad_size // dn.num_groups
            group = slice(perturb_group * single, (perturb_group + 1) * single)
            dn.content[:, group] = torch.randn_like(dn.content[:, group])
        return dn

    model.make_denoising = make
    try:
        images = model.preprocess_image(batch)
        targets = model.prepare_targets(batch, images)
        with torch.no_grad():
            out = model.forward_predictions(images, with_aux=True, targets=targets)
    finally:
        model.make_denoising = original
    matching = torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
    return out["dn_outputs"]["pred_logits"], matching


@pytest.mark.parametrize("family", list(FAMILIES))
def test_groups_and_matching_queries_do_not_see_each_others_perturbations(family):
    """Perturbing one group's input changes that group's outputs only: no other group's and
    no matching query's."""
    # 3 groups (DINO: 6 // the 2 objects of the busiest image)
    model = build_model(_cfg(FAMILIES[family], "MODEL.DAB_DETR.DN.NUM_GROUPS", "3",
                             "MODEL.DAB_DETR.DINO.DN_NUMBER", "6")).train()
    batch = _batch([2, 1])
    dn, matching = _dn_and_matching(model, batch)
    dn_p, matching_p = _dn_and_matching(model, batch, perturb_group=1)
    torch.testing.assert_close(matching_p, matching, rtol=0, atol=1e-6)
    single = dn.shape[2] // 3
    for g in range(3):
        group = slice(g * single, (g + 1) * single)
        diff = (dn_p[:, :, group] - dn[:, :, group]).abs().max()
        assert (diff > 1e-3) if g == 1 else (diff < 1e-6), (g, diff)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matching_queries_compute_what_they_would_without_denoising(family):
    model = build_model(_cfg(FAMILIES[family])).train()
    batch = _batch([3, 1])
    _, with_dn = _dn_and_matching(model, batch)
    images = model.preprocess_image(batch)
    with torch.no_grad():
        out = model.forward_predictions(images, with_aux=True, targets=None)
    without = torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
    assert "dn_outputs" not in out
    torch.testing.assert_close(with_dn, without, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_denoising_losses_every_layer_and_no_cost_at_inference(family):
    cfg = _cfg(FAMILIES[family])
    model = build_model(cfg).train()
    losses = model(_batch([2, 0]))  # one image without objects
    layers = cfg.MODEL.DAB_DETR.DEC_LAYERS
    dn_keys = {f"loss_{t}_dn" for t in ("ce", "bbox", "giou")}
    dn_keys |= {f"loss_{t}_dn_{i}" for t in ("ce", "bbox", "giou") for i in range(layers - 1)}
    assert dn_keys <= set(losses)
    assert all(torch.isfinite(v) and v > 0 for k, v in losses.items() if k in dn_keys)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    # inference: no denoising queries
    model.eval()
    images = model.preprocess_image(_batch([2, 0]))
    with torch.no_grad():
        out = model.forward_predictions(images, with_aux=False)
    assert set(out) == {"pred_logits", "pred_boxes"} and out["pred_logits"].shape[1] == 10


def test_denoising_loss_is_the_reconstruction_error():
    """A perfect reconstruction (the clean boxes) gives zero L1 and GIoU terms; the terms are
    normalised by the groups times the box count."""
    model = build_model(_cfg(DAB))
    criterion = model.criterion
    targets = _targets([2, 1])
    dn = make_denoising_queries(targets, model.label_enc, 2, 0.0, 0.4, K, 10)
    boxes = torch.zeros(1, 2, dn.pad_size, 4)
    boxes[:, dn.batch_idx, dn.slot] = dn.boxes
    logits = torch.full((1, 2, dn.pad_size, K), -20.0)
    logits[:, dn.batch_idx, dn.slot, dn.labels] = 20.0
    out = {"pred_logits": logits, "pred_boxes": boxes, "batch_idx": dn.batch_idx,
           "slot": dn.slot, "labels": dn.labels, "boxes": dn.boxes, "num_groups": 2}
    losses = criterion.denoising_losses(out, num_boxes=3.0)
    assert set(losses) == {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"}
    assert losses["loss_bbox_dn"] == 0 and losses["loss_giou_dn"].abs() < 1e-5  # float32 GIoU
    assert losses["loss_ce_dn"] < 1e-6
    # every cx off by 0.1, 6 queries: L1 = 6 * 0.1 / (num_boxes * groups), whatever their count
    boxes[:, dn.batch_idx, dn.slot, 0] += 0.1
    losses = criterion.denoising_losses(out, num_boxes=5.0)
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(0.6 / 10))


def _ddp_worker(rank, init_file, config, weights, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = build_model(_cfg(config))
        model.load_state_dict(torch.load(weights, weights_only=True))
        model = DistributedDataParallel(model.train())  # find_unused_parameters=False
        # rank 1's images have no object: it makes no denoising query at all
        losses = model(_batch([2, 1] if rank == 0 else [0, 0]))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()
                 if p.grad is not None}
        torch.save({"grads": grads, "params": [n for n, _ in model.module.named_parameters()]},
                   f"{result}{rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ddp_step_where_a_worker_has_no_object(tmp_path, family):
    """Under DDP (gloo, two processes) every parameter gets a gradient on both workers, also
    on the one without objects, and the averaged gradients agree."""
    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    torch.save(build_model(_cfg(FAMILIES[family])).state_dict(), weights)
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), FAMILIES[family],
                                          str(weights), str(tmp_path / "rank")),
                       nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    for r in ranks:
        assert set(r["grads"]) == set(r["params"])
    for name, g in ranks[0]["grads"].items():
        torch.testing.assert_close(ranks[1]["grads"][name], g, rtol=0, atol=0, msg=name)
    assert ranks[0]["grads"]["label_enc.weight"].abs().sum() > 0


def test_dn_checkpoint_into_a_model_without_dn_is_refused(tmp_path):
    path = tmp_path / "dn.pth"
    torch.save({"model": build_model(_cfg(DAB)).state_dict()}, path)
    plain = build_model(get_dab_detr_cfg(DAB, ["MODEL.WEIGHTS", "", *SMALL]))
    with pytest.raises(ValueError, match="MODEL.DAB_DETR.DN.ENABLED"):
        DabDetrCheckpointer(plain).load(str(path))


def test_dn_checkpoint_of_another_class_count_fine_tunes(tmp_path, caplog):
    """As for the class head: the label embedding of another class count is not loaded (it
    has a row per class), with a warning; everything else is."""
    source = build_model(_cfg(DAB, "MODEL.DAB_DETR.NUM_CLASSES", "8"))
    path = tmp_path / "dn8.pth"
    torch.save({"model": source.state_dict()}, path)
    target = build_model(_cfg(DAB))
    before = target.label_enc.weight.detach().clone()
    DabDetrCheckpointer(target).load(str(path))
    torch.testing.assert_close(target.label_enc.weight, before)
    torch.testing.assert_close(target.refpoint_embed.weight, source.refpoint_embed.weight)
    assert "class head for 8 classes, the model 5" in caplog.text
    assert "label_enc.weight" in caplog.text
