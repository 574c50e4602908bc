"""Denoising training (DN-DETR, Li et al., CVPR 2022): noised copies of the ground truth as
extra decoder queries, each reconstructing the object it was made from, with no matching.

In training, the decoder's queries are ``[group 0 | group 1 | ... | group G-1 | matching
queries]``. Each group holds one query per ground-truth object of the image (padded to the
batch's largest count): its label replaced by a random class with probability
``label_noise``, its box jittered (centre by up to ``box_noise * (w/2, h/2)``, size by up to
``box_noise * (w, h)``) and used as the query's anchor, its content the label's embedding plus
an indicator 1 (matching queries carry 0). The decoder's self-attention mask keeps the
matching queries blind to every denoising query, and each group blind to the other groups,
so that the matching queries compute exactly what they would without denoising. Unlike the
official code, padding slots are masked too: no query attends them.

Contrastive denoising (DINO, Zhang et al., ICLR 2023, Sec. 3.3; ``prepare_for_cdn`` of
IDEA-Research/DINO), :func:`make_contrastive_denoising_queries`: each group holds every object
twice, a *positive* query (each box corner moved by less than ``box_noise`` times half the
box's width or height) that reconstructs it, then a *negative* one (moved by between one and
two times that) whose target is "no object". Group g is ``[positives | negatives]``, S slots
each; the number of groups follows from the batch: ``max(1, dn_number // S)``.

Shapes: B batch, N_b objects of image b, N = sum N_b, S = max N_b, G groups, PAD = G * S
denoising queries per image (contrastive: 2 * G * S), NM matching queries, T = PAD + NM,
C channels, K classes. Boxes are cxcywh normalised to [0, 1].
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from ..layers import inverse_sigmoid

__all__ = [
    "DenoisingQueries",
    "contrastive_groups",
    "denoising_attn_mask",
    "make_contrastive_denoising_queries",
    "make_denoising_queries",
]


@dataclass
class DenoisingQueries:
    """The denoising queries of a batch and what their losses need.

    Attributes:
        content: ``(B, PAD, C)`` label embedding and indicator 1; zero at padding slots.
        anchors: ``(B, PAD, 4)`` the noised boxes before the sigmoid (0 at padding).
        attn_mask: ``(B, 1, T, T)`` bool, True where query r may attend query c.
        batch_idx, slot: ``(G * N,)`` where each real denoising query sits, group-major
            (contrastive: ``(2 * G * N,)``, each group's positives then its negatives).
        labels: ``(G * N,)`` the clean label each one reconstructs.
        boxes: ``(G * N, 4)`` the clean box each one reconstructs.
        num_groups: G.
        positive: contrastive only, ``(2 * G * N,)`` bool: True for the queries that
            reconstruct their object, False for the negatives, whose target is "no object"
            (their ``labels`` and ``boxes`` are unused); None: every query is positive.
    """

    content: torch.Tensor
    anchors: torch.Tensor
    attn_mask: torch.Tensor
    batch_idx: torch.Tensor
    slot: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    num_groups: int
    positive: Optional[torch.Tensor] = None

    @property
    def pad_size(self) -> int:
        return self.content.shape[1]


def denoising_attn_mask(
    counts: List[int],
    num_groups: int,
    num_matching: int,
    device: torch.device,
    contrastive: bool = False,
) -> torch.Tensor:
    """The decoder self-attention mask of a batch with denoising.

    Args:
        counts: N_b, the objects of each image.
        num_groups: G.
        num_matching: NM.
        contrastive: each group is ``[S positives | S negatives]`` (2 * S slots), not S.

    Returns:
        ``(B, 1, T, T)`` bool, True where row query r may attend column query c: a matching
        query attends matching queries only; a denoising query attends its own group and the
        matching queries; no query attends a padding slot but itself.
    """
    single = max(counts, default=0)
    group_size = single * (2 if contrastive else 1)
    pad = group_size * num_groups
    total = pad + num_matching
    index = torch.arange(total, device=device)
    group = torch.where(index < pad, index // max(group_size, 1), num_groups)  # NM: group G
    is_dn = index < pad
    # a denoising row sees its own group; any row sees the matching columns
    allowed = (group[:, None] == group[None, :]) | ~is_dn[None, :]
    # matching rows see no denoising column
    allowed = allowed & ~(~is_dn[:, None] & is_dn[None, :])
    # (B, T): padding slots j >= N_b of every group (of each half of a contrastive group)
    slot_in_group = index % max(single, 1)
    # the counts go to the device without waiting for it (a blocking copy would synchronise)
    counts_t = torch.as_tensor(counts, dtype=torch.int64).to(device, non_blocking=True)
    padding = is_dn[None, :] & (slot_in_group[None, :] >= counts_t[:, None])
    eye = torch.eye(total, dtype=torch.bool, device=device)
    allowed = allowed[None] & (~padding[:, None, :] | eye[None])
    return allowed[:, None]  # (B, 1, T, T)


def _copies(targets: List[Dict[str, torch.Tensor]], copies: int, device: torch.device):
    """``copies`` copies of the batch's objects, copy-major: ``(labels, boxes, batch_idx, slot,
    copy)``, each ``(copies * N, ...)``; copy c of object m of image b sits at slot
    ``c * S + m`` of image b."""
    counts = [len(t["labels"]) for t in targets]
    single = max(counts, default=0)
    labels = torch.cat([t["labels"] for t in targets]).to(device)  # (N,)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)  # (N, 4)
    batch_of = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(counts)])
    slot_of = torch.cat([torch.arange(n, device=device) for n in counts])
    copy = torch.arange(copies, device=device).repeat_interleave(len(slot_of))
    return (labels.repeat(copies), boxes.repeat(copies, 1), batch_of.repeat(copies),
            slot_of.repeat(copies) + copy * single, copy)


def _redraw_labels(labels: torch.Tensor, probability: float, num_classes: int,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """``labels`` with each redrawn uniformly from the K classes with ``probability``."""
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator,
                                  device=labels.device)
    # where, not noised[flip] = ...: a boolean index has a data-dependent size (a host sync)
    return torch.where(flip, random_labels, labels)


def _place(embed: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, slot: torch.Tensor,
           batch_size: int, pad: int):
    """``(content (B, PAD, C), anchors (B, PAD, 4))``: each query's content and its box's
    inverse sigmoid at its slot, zero at the padding slots."""
    content = embed.new_zeros(batch_size, pad, embed.shape[1])
    anchors = embed.new_zeros(batch_size, pad, 4)
    content[batch_idx, slot] = embed
    anchors[batch_idx, slot] = inverse_sigmoid(boxes).to(anchors.dtype)
    return content, anchors


def make_denoising_queries(
    targets: List[Dict[str, torch.Tensor]],
    label_embed: nn.Embedding,
    num_groups: int,
    label_noise: float,
    box_noise: float,
    num_classes: int,
    num_matching: int,
    generator: Optional[torch.Generator] = None,
) -> DenoisingQueries:
    """Noised copies of ``targets`` as decoder queries.

    Args:
        targets: per image, ``labels`` ``(N_b,)`` and ``boxes`` ``(N_b, 4)`` cxcywh in [0, 1].
        label_embed: ``K + 1`` rows of width C - 1 (the last row: "no object", the content of
            DN-DAB-DETR's matching queries).
        num_groups: G.
        label_noise: probability that a query's label is replaced by one drawn uniformly
            from the K classes (possibly the same).
        box_noise: the jitter's scale (see the module docstring).
        num_classes: K.
        num_matching: NM, the matching queries that follow the denoising ones.
        generator: random numbers for the noise (default: torch's global generator).
    """
    device = label_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    single = max(counts, default=0)
    # G copies, group-major: query g * N + m is object m of the batch in group g
    labels, boxes, batch_idx, slot, _ = _copies(targets, num_groups, device)
    noised_labels = _redraw_labels(labels, label_noise, num_classes, generator)
    # centre by up to box_noise * (w/2, h/2), size by up to box_noise * (w, h)
    scale = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
    jitter = torch.rand(boxes.shape, generator=generator, device=device) * 2 - 1
    noised_boxes = (boxes + jitter * scale * box_noise).clamp(0.0, 1.0)

    b, pad = len(targets), single * num_groups
    embed = label_embed(noised_labels)  # (G * N, C - 1)
    # (G * N, C): the indicator 1 marks denoising queries
    embed = torch.cat([embed, embed.new_ones(len(embed), 1)], 1)
    content, anchors = _place(embed, noised_boxes, batch_idx, slot, b, pad)
    return DenoisingQueries(
        content=content,
        anchors=anchors,
        attn_mask=denoising_attn_mask(counts, num_groups, num_matching, device),
        batch_idx=batch_idx,
        slot=slot,
        labels=labels,
        boxes=boxes,
        num_groups=num_groups,
    )


def contrastive_groups(dn_number: int, counts: List[int]) -> int:
    """DINO's group count G for a batch: ``dn_number`` positive (and as many negative)
    queries at most, for the image with the most objects; at least one group."""
    most = max(counts, default=0)
    return max(1, dn_number // most) if most else 1


def make_contrastive_denoising_queries(
    targets: List[Dict[str, torch.Tensor]],
    label_embed: nn.Embedding,
    dn_number: int,
    label_noise: float,
    box_noise: float,
    num_classes: int,
    num_matching: int,
    generator: Optional[torch.Generator] = None,
) -> DenoisingQueries:
    """DINO's positive and negative noised copies of ``targets`` as decoder queries.

    Args:
        targets: per image, ``labels`` ``(N_b,)`` and ``boxes`` ``(N_b, 4)`` cxcywh in [0, 1].
        label_embed: at least K rows of width C (DINO's ``label_enc``, K + 1 rows).
        dn_number: positive queries per image at most (``contrastive_groups``).
        label_noise: probability that a query's label is redrawn uniformly from the K classes
            (possibly the same); DINO's ``dn_label_noise_ratio`` 0.5 is this 0.25.
        box_noise: ``lambda``: positives move each corner by ``u * lambda`` times half the
            box's width (x) or height (y), ``u`` uniform in [0, 1), negatives by ``1 + u``;
            the sign is random; the box is clipped to the image.
        num_classes: K.
        num_matching: NM, the matching queries that follow the denoising ones.
        generator: random numbers for the noise (default: torch's global generator).
    """
    device = label_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    single = max(counts, default=0)
    num_groups = contrastive_groups(dn_number, counts)
    # 2G copies, group-major, each group's positives then its negatives: copy h = 2g + neg
    copies = 2 * num_groups
    labels, boxes, batch_idx, slot, half = _copies(targets, copies, device)
    positive = half % 2 == 0
    noised_labels = _redraw_labels(labels, label_noise, num_classes, generator)
    # each corner by a fraction of half the box's width or height: [0, 1) for positives,
    # [1, 2) for negatives, with a random sign
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half_size = boxes[:, 2:].repeat(1, 2) / 2
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=device) * 2.0 - 1.0
    magnitude = torch.rand(boxes.shape, generator=generator, device=device)
    magnitude = magnitude + (~positive)[:, None].to(magnitude.dtype)
    corners = (corners + sign * magnitude * half_size * box_noise).clamp(0.0, 1.0)
    noised_boxes = box_convert(corners, "xyxy", "cxcywh")

    b, pad = len(targets), copies * single
    embed = label_embed(noised_labels)  # (2G * N, C)
    content, anchors = _place(embed, noised_boxes, batch_idx, slot, b, pad)
    return DenoisingQueries(
        content=content,
        anchors=anchors,
        attn_mask=denoising_attn_mask(counts, num_groups, num_matching, device,
                                      contrastive=True),
        batch_idx=batch_idx,
        slot=slot,
        labels=labels,
        boxes=boxes,
        num_groups=num_groups,
        positive=positive,
    )
