"""DINO's own parts: contrastive denoising (positive and negative noise in their bands, label
noise, group count, negatives supervised as "no object"), look forward twice, the shared
heads, the static content queries, the official converter's checks, and DINO on a training
step. (Equivalence with the official code: test_equivalence_official.py; the denoising mask
and the matching queries' independence: test_denoising.py.)"""

import math

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import SMALL, config_path
from dab_detr.checkpoint import DabDetrCheckpointer
from dab_detr.checkpoint.conversion import convert_official
from dab_detr.config import get_dab_detr_cfg
from dab_detr.layers import MLP, MSDeformAttn
from dab_detr.modeling.deformable_transformer import (
    DABDeformableDecoder,
    DeformableDecoderLayer,
)
from dab_detr.modeling.denoising import (
    contrastive_groups,
    denoising_attn_mask,
    make_contrastive_denoising_queries,
)
from dab_detr.utils.user_errors import InputValueError

DINO = config_path("quick_schedules/dino_R_18_shapes.yaml")
K = 5


def _cfg(*opts: str):
    return get_dab_detr_cfg(DINO, ["MODEL.WEIGHTS", "", *SMALL, *opts])


def _targets(counts, size=(0.02, 0.1), generator=None):
    """Per image, ``counts[b]`` objects of random classes, centred in [0.4, 0.6], of sides in
    ``size``: far enough from the border that no noise of scale 1 clips them."""
    g = generator or torch.Generator().manual_seed(0)
    lo, hi = size
    return [{"labels": torch.randint(0, K, (n,), generator=g),
             "boxes": torch.cat([0.4 + 0.2 * torch.rand(n, 2, generator=g),
                                 lo + (hi - lo) * torch.rand(n, 2, generator=g)], 1)}
            for n in counts]


def _corner_shift(dn, box_noise):
    """Per denoising query and corner, the shift of the noised box's corner over half the
    clean box's width (x) or height (y), divided by the noise scale: ``(2G * N, 4)``."""
    noised = dn.anchors[dn.batch_idx, dn.slot].sigmoid()
    to_corners = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]],
                              dtype=noised.dtype)
    corners, clean = noised @ to_corners, dn.boxes @ to_corners
    half = dn.boxes[:, 2:].repeat(1, 2) / 2
    return (corners - clean) / (half * box_noise)


def test_positive_and_negative_noise_stay_in_their_bands():
    """Each corner of a positive moves by less than lambda times half the box's side, of a
    negative by between lambda and 2 lambda, with either sign, uniformly within its band
    (12,000 corners of the positives: the mean of U(0, 1) has a standard error of 0.003)."""
    targets = _targets([300] * 10)
    box_noise = 0.8
    embed = nn.Embedding(K + 1, 8)
    dn = make_contrastive_denoising_queries(targets, embed, dn_number=300, label_noise=0.0,
                                            box_noise=box_noise, num_classes=K, num_matching=5)
    assert dn.num_groups == 1 and dn.positive.sum() == (~dn.positive).sum() == 3000
    shift = _corner_shift(dn, box_noise)
    # A negative's corners may cross (both move inwards by more than half the side): its
    # width or height is then negative, which the anchor's inverse sigmoid clamps to 1e-3, as
    # in the official code; only the uncrossed ones tell the shift. Positives never cross.
    size = dn.anchors[dn.batch_idx, dn.slot].sigmoid()[:, 2:]
    uncrossed = (size > 2e-3).all(1)
    assert uncrossed[dn.positive].all() and uncrossed[~dn.positive].float().mean() > 0.5
    # the sigmoid of the stored inverse sigmoid is exact to ~1e-6 of the shift
    pos, neg = shift[dn.positive].abs(), shift[~dn.positive & uncrossed].abs()
    assert pos.max() < 1 + 1e-4 and neg.min() > 1 - 1e-4 and neg.max() < 2 + 1e-4
    assert abs(pos.mean().item() - 0.5) < 0.015 and abs(neg.mean().item() - 1.5) < 0.015
    for band in (shift[dn.positive], shift[~dn.positive & uncrossed]):
        assert abs((band > 0).float().mean().item() - 0.5) < 0.02  # either sign
    # no label noise: every query, positive or negative, carries its object's label
    torch.testing.assert_close(dn.content[dn.batch_idx, dn.slot], embed(dn.labels))


def test_label_noise_and_its_config():
    """A label is redrawn uniformly from K classes with probability ``label_noise``, so it
    changes with probability label_noise * (1 - 1 / K); DINO's DN.LABEL_NOISE 0.5 (its
    dn_label_noise_ratio) is a redraw probability of 0.25 (the official code's ``p <
    label_noise_ratio * 0.5``): 0.25 * 0.8 = 0.2, over 60,000 queries a standard error of
    0.0016."""
    model = build_model(_cfg("MODEL.DAB_DETR.DN.LABEL_NOISE", "0.5"))
    assert model.denoising["label_noise"] == 0.25
    embed = nn.Embedding(K + 1, 4)
    captured = {}
    embed.register_forward_pre_hook(lambda module, args: captured.update(labels=args[0]))
    dn = make_contrastive_denoising_queries(_targets([1000] * 10), embed, num_classes=K,
                                            num_matching=5,
                                            **{**model.denoising, "dn_number": 3000})
    assert dn.num_groups == 3
    changed = (captured["labels"] != dn.labels).float().mean().item()
    assert abs(changed - 0.2) < 0.008


def test_groups_follow_the_busiest_image():
    """max(1, dn_number // the most objects of an image): 100 // 7 = 14 groups of 7 positive
    and 7 negative slots; a batch without objects gets one empty group."""
    assert contrastive_groups(100, [7, 2]) == 14
    assert contrastive_groups(100, [300]) == 1
    assert contrastive_groups(100, [0, 0]) == 1
    dn = make_contrastive_denoising_queries(_targets([7, 2]), nn.Embedding(K + 1, 4), 100, 0.0,
                                            1.0, K, 5)
    assert dn.num_groups == 14 and dn.pad_size == 14 * 2 * 7
    # image 1's real slots in group 3: positives 2 * 7 * 3 + (0, 1), negatives + 7
    mine = dn.slot[(dn.batch_idx == 1)].tolist()
    assert {42, 43, 49, 50} <= set(mine) and 44 not in mine and 51 not in mine
    assert dn.positive[dn.slot == 49].logical_not().all()
    empty = make_contrastive_denoising_queries(_targets([0, 0]), nn.Embedding(K + 1, 4), 100,
                                               0.5, 1.0, K, 5)
    assert empty.pad_size == 0 and empty.attn_mask.shape == (2, 1, 5, 5)
    assert empty.attn_mask.all()


def test_mask_groups_are_positives_and_negatives_together():
    """Contrastive groups of 2S slots: a denoising query sees its group's positives and
    negatives and the matching queries, nothing of another group."""
    allowed = denoising_attn_mask([2, 2], num_groups=2, num_matching=3,
                                  device=torch.device("cpu"), contrastive=True)[0, 0]
    pad = 8
    for r in range(pad + 3):
        for c in range(pad + 3):
            expected = c >= pad if r >= pad else (c >= pad or r // 4 == c // 4)
            assert bool(allowed[r, c]) == expected, (r, c)


def test_negatives_are_supervised_as_no_object():
    """The class loss of the denoising queries wants the positives' labels and nothing for the
    negatives; their boxes do not count."""
    model = build_model(_cfg())
    criterion = model.criterion
    targets = _targets([2, 1])
    dn = make_contrastive_denoising_queries(targets, model.label_enc, 100, 0.0, 1.0, K, 10)
    n = len(dn.labels)
    logits = torch.full((1, 2, dn.pad_size, K), -20.0)
    pos_b, pos_s = dn.batch_idx[dn.positive], dn.slot[dn.positive]
    logits[:, pos_b, pos_s, dn.labels[dn.positive]] = 20.0
    boxes = torch.zeros(1, 2, dn.pad_size, 4)
    boxes[:, dn.batch_idx, dn.slot] = dn.boxes
    out = {"pred_logits": logits, "pred_boxes": boxes, "batch_idx": dn.batch_idx,
           "slot": dn.slot, "labels": dn.labels, "boxes": dn.boxes,
           "num_groups": dn.num_groups, "positive": dn.positive}
    perfect = criterion.denoising_losses(out, num_boxes=3.0)
    assert perfect["loss_ce_dn"] < 1e-6 and perfect["loss_bbox_dn"] == 0
    # a negative that claims its object's class is penalised as a false positive: focal
    # (1 - alpha) * BCE(20, 0) = 0.75 * 20, over num_boxes * groups = 3 * 50
    neg = (~dn.positive).nonzero()[0, 0]
    logits[:, dn.batch_idx[neg], dn.slot[neg], dn.labels[neg]] = 20.0
    torch.testing.assert_close(criterion.denoising_losses(out, num_boxes=3.0)["loss_ce_dn"],
                               torch.tensor(0.75 * 20 / 150), rtol=1e-4, atol=0)
    # the negatives' boxes are not supervised: moving them changes no box term
    logits[:, dn.batch_idx[neg], dn.slot[neg], dn.labels[neg]] = -20.0
    boxes[:, dn.batch_idx[~dn.positive], dn.slot[~dn.positive]] += 0.2
    moved = criterion.denoising_losses(out, num_boxes=3.0)
    assert moved["loss_bbox_dn"] == 0
    assert torch.equal(moved["loss_giou_dn"], perfect["loss_giou_dn"])  # float32 GIoU ~1e-5
    assert n == 2 * dn.num_groups * 3


def _decoder(look_forward_twice: bool, shared: bool) -> DABDeformableDecoder:
    torch.manual_seed(0)
    c, levels = 32, 2
    layers = nn.ModuleList(DeformableDecoderLayer(c, 4, 64, 0.0, nn.ReLU, levels, 2)
                           for _ in range(3))
    for m in layers.modules():
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()
    heads = MLP(c, c, 4, 3) if shared else nn.ModuleList(MLP(c, c, 4, 3) for _ in range(3))
    decoder = DABDeformableDecoder(layers, c, heads, query_scale=False, final_norm=True,
                                   look_forward_twice=look_forward_twice)
    # a trained final norm: as initialised it would repeat the layers' own last norm
    nn.init.uniform_(decoder.norm.weight, 0.5, 1.5)
    nn.init.uniform_(decoder.norm.bias, -0.5, 0.5)
    return decoder


def _decode(decoder):
    g = torch.Generator().manual_seed(1)
    shapes = [(6, 8), (3, 4)]
    memory = torch.randn(2, 60, 32, generator=g)
    start = torch.tensor([0, 48])
    ratios = torch.ones(2, 2, 2)
    tgt = torch.randn(2, 5, 32, generator=g)
    anchors = 0.3 + 0.4 * torch.rand(2, 5, 4, generator=g)
    return decoder(tgt, anchors, memory, shapes, start, ratios, None)


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_trains_the_earlier_box_head(look_forward_twice):
    """With one box head per layer: the second layer's box loss reaches the first layer's box
    head only when looking forward twice (its reported boxes refine the first layer's boxes
    before the detach); and a layer's reported boxes come from its normed output."""
    decoder = _decoder(look_forward_twice, shared=False)
    hs, boxes, references = _decode(decoder)
    boxes[1].sum().backward()
    first_head = [p.grad for p in decoder.bbox_embed[0].parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in first_head)
    assert reached == look_forward_twice
    assert references[1].requires_grad == look_forward_twice
    # the reference of layer 1 is layer 0's boxes from its raw (not normed) output: the next
    # layer's anchors, whatever the switch
    with torch.no_grad():
        hs2, boxes2, refs2 = _decode(decoder)
    torch.testing.assert_close(refs2[0], references[0].detach())
    assert not torch.allclose(refs2[1], boxes2[0])  # reported boxes: from the normed output


def test_heads_and_their_initialisation():
    """As the official model: one class and one box head for every decoder layer (the decoder's
    box head is the detector's), encoder heads that start as copies of them but are modules of
    their own, the focal prior in the class biases, zero box deltas, and Xavier-uniform static
    content queries (drawn N(0, 1), then Xavier like every matrix of the transformer)."""
    model = build_model(_cfg())
    decoder = model.transformer.decoder
    assert decoder.box_head(0) is decoder.box_head(len(decoder.layers) - 1) is model.bbox_embed
    proposals = model.transformer.proposals
    for enc, dec in ((proposals.enc_out_class_embed, model.class_embed),
                     (proposals.enc_out_bbox_embed, model.bbox_embed)):
        assert enc is not dec
        for (name, a), b in zip(enc.state_dict().items(), dec.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.class_embed.bias,
                               torch.full((K,), -math.log((1 - 0.01) / 0.01)))
    assert (model.bbox_embed.layers[-1].weight == 0).all()
    tgt = proposals.tgt_embed.weight  # (10, 64): Xavier bound sqrt(6 / 74)
    bound = math.sqrt(6 / sum(tgt.shape))
    assert tgt.abs().max() <= bound and tgt.std() > bound / 3


def test_checkpoint_head_layouts(tmp_path, caplog):
    """A file with shared heads (the official layout) loads into a model with one head per
    layer (detrex's) as copies; the reverse is refused naming the key; a model without
    denoising drops the file's label embedding with a warning."""
    shared = build_model(_cfg())
    path = tmp_path / "shared.pth"
    torch.save({"model": shared.state_dict()}, path)
    per_layer = build_model(_cfg("MODEL.DAB_DETR.DINO.SHARED_HEADS", "False"))
    DabDetrCheckpointer(per_layer).load(str(path))
    for i in range(2):
        torch.testing.assert_close(per_layer.class_embed[i].weight, shared.class_embed.weight)
        torch.testing.assert_close(per_layer.bbox_embed[i].layers[0].weight,
                                   shared.bbox_embed.layers[0].weight)
    assert per_layer.transformer.decoder.box_head(1) is per_layer.bbox_embed[1]
    torch.save({"model": per_layer.state_dict()}, tmp_path / "per_layer.pth")
    with pytest.raises(InputValueError,
                       match=r"per_layer\.pth.*MODEL\.DAB_DETR\.DINO\.SHARED_HEADS"):
        DabDetrCheckpointer(build_model(_cfg())).load(str(tmp_path / "per_layer.pth"))
    no_dn = build_model(_cfg("MODEL.DAB_DETR.DN.ENABLED", "False"))
    with caplog.at_level("WARNING"):
        DabDetrCheckpointer(no_dn).load(str(path))
    assert "label_enc.weight" in caplog.text
    torch.testing.assert_close(no_dn.class_embed.weight, shared.class_embed.weight)


def test_dino_model_heads_and_static_content():
    """One class and one box head for the decoder (the decoder's box head is the detector's),
    encoder heads of their own, and content queries that depend on no image."""
    model = build_model(_cfg()).eval()
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    proposals = model.transformer.proposals
    assert proposals.enc_out_bbox_embed is not model.bbox_embed
    assert proposals.enc_out_class_embed is not model.class_embed
    assert proposals.tgt_embed.weight.shape == (10, 64)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("class_embed.0") for n in names)
    memory = torch.randn(2, 30, 64)
    tgt, anchors, logits, boxes = proposals(memory, torch.zeros(2, 30, dtype=torch.bool),
                                            [(5, 6)])
    torch.testing.assert_close(tgt[0], tgt[1])
    torch.testing.assert_close(tgt[0], proposals.tgt_embed.weight)
    assert logits.shape == (2, 10, K) and boxes.shape == (2, 10, 4)
    assert not anchors.requires_grad


def test_official_converter_refuses_heads_that_differ():
    """DINO's twelve names of a head must hold one tensor: a checkpoint where they differ is
    not the official model's, and the converter names two of them."""
    sd = {"transformer.tgt_embed.weight": torch.zeros(3, 4),
          "transformer.decoder.class_embed.0.weight": torch.zeros(91, 4),
          "transformer.decoder.class_embed.0.bias": torch.zeros(91),
          "class_embed.0.weight": torch.zeros(91, 4),
          "class_embed.0.bias": torch.zeros(91),
          "class_embed.1.weight": torch.ones(91, 4),
          "class_embed.1.bias": torch.zeros(91)}
    with pytest.raises(InputValueError, match=r"class_embed\.1\.weight"):
        convert_official({"model": sd}, num_classes=None)
    sd["class_embed.1.weight"] = torch.zeros(91, 4)
    out = convert_official({"model": sd}, num_classes=None)
    assert set(out) == {"transformer.proposals.tgt_embed.weight", "class_embed.weight",
                        "class_embed.bias"}


def test_dino_training_step_with_an_empty_image():
    """A step with an image without objects: every loss finite, every parameter in the graph
    (the interm and denoising terms included); inference keeps NUM_SELECT detections."""
    cfg = _cfg()
    model = build_model(cfg).train()
    from test_denoising import _batch
    losses = model(_batch([3, 0]))
    assert {"loss_ce_interm", "loss_bbox_interm", "loss_giou_interm", "loss_ce_dn"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert math.isclose(model.denoising["box_noise"], cfg.MODEL.DAB_DETR.DN.BOX_NOISE)


@pytest.mark.parametrize("opts, named", [
    (["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE", "False"], "MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE"),
    (["MODEL.DAB_DETR.DEFORMABLE.TWO_STAGE_QUERY", "official"], "TWO_STAGE_QUERY='official'"),
    (["MODEL.DAB_DETR.AUX_LOSS", "False"], "MODEL.DAB_DETR.AUX_LOSS"),
    (["MODEL.DAB_DETR.HIDDEN_DIM", "48"], "MODEL.DAB_DETR.HIDDEN_DIM"),
    (["MODEL.DAB_DETR.DINO.DN_NUMBER", "0"], "MODEL.DAB_DETR.DINO.DN_NUMBER"),
])
def test_unsupported_settings_are_refused_by_name(opts, named):
    with pytest.raises(ValueError, match=named):
        build_model(_cfg(*opts))
