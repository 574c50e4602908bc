"""The set criterion of every family: sigmoid focal classification (DETR: softmax
cross-entropy with a "no object" class), L1 and GIoU box losses on Hungarian-matched pairs,
for the final and every auxiliary decoder layer; on the same terms, the two-stage proposals
(class-agnostic, ``_enc``; DINO's, with classes, ``_interm``) and the denoising queries (their own
objects, no matching, ``_dn``).

Shapes: B batch, NQ queries, K classes, N_i target boxes of image i. Boxes are cxcywh
normalised to [0, 1].
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from ..layers.box_ops import paired_giou_loss
from .matcher import HungarianMatcher

__all__ = ["SetCriterion"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class SetCriterion(nn.Module):
    """Computes the unweighted loss terms; ``weight_dict`` says how to weight each one."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        no_object_weight: Optional[float] = None,
    ):
        """
        Args:
            num_classes: K.
            matcher: assigns predictions to targets.
            weight_dict: weight of ``loss_ce``, ``loss_bbox``, ``loss_giou`` and of their
                copies: auxiliary ``loss_ce_0``, ... (one suffix per decoder layer but the
                last), proposals ``loss_ce_enc``, denoising ``loss_ce_dn``, ``loss_ce_dn_0``...
            focal_alpha, focal_gamma: focal-loss parameters.
            no_object_weight: DETR: the logits have K + 1 columns, the last "no object", the
                class of every unmatched query; the class loss is their softmax
                cross-entropy, that class weighted by this (0.1), averaged over the queries'
                weights. None: sigmoid focal loss over K columns.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.no_object_weight = no_object_weight
        if no_object_weight is not None:
            class_weight = torch.ones(num_classes + 1)
            class_weight[-1] = no_object_weight
            self.register_buffer("class_weight", class_weight, persistent=False)

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: torch.Tensor,
                    pair_mask: Optional[torch.Tensor] = None):
        """Sigmoid focal loss against one-hot targets (all zeros for unmatched queries),
        summed over queries and classes and divided by the number of target boxes; with
        ``no_object_weight``, DETR's weighted softmax cross-entropy. ``pair_mask``: ``(M,)``
        bool over the M pairs of ``indices``; a pair that is False counts as unmatched (a mask
        rather than a selection: selecting has a data-dependent size, a host-device sync)."""
        logits = outputs["pred_logits"]  # (B, NQ, K), or K + 1 with no_object_weight
        if self.no_object_weight is not None:
            return {"loss_ce": self._softmax_loss(logits, targets, indices)}
        target = torch.zeros_like(logits)
        batch_idx, query_idx = _flat_indices(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target[batch_idx, query_idx, labels] = 1.0 if pair_mask is None else pair_mask.to(
            target.dtype)
        loss = sigmoid_focal_loss(
            logits, target, self.focal_alpha, self.focal_gamma, reduction="sum"
        )
        return {"loss_ce": loss / num_boxes}

    def _softmax_loss(self, logits: torch.Tensor, targets, indices: Indices) -> torch.Tensor:
        """DETR's class loss: every query's target is its matched object's class, or K ("no
        object"); cross-entropy weighted by ``class_weight``, averaged over those weights."""
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                            device=logits.device)
        batch_idx, query_idx = _flat_indices(indices)
        target[batch_idx, query_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, indices)])
        weight = self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits.transpose(1, 2), target, weight)

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: torch.Tensor,
                   pair_mask: Optional[torch.Tensor] = None):
        """L1 and GIoU losses of the matched boxes (those of ``pair_mask``, see
        ``loss_labels``), summed and divided by the box count."""
        batch_idx, query_idx = _flat_indices(indices)
        src = outputs["pred_boxes"][batch_idx, query_idx]  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_giou = paired_giou_loss(box_convert(src, "cxcywh", "xyxy"),
                                     box_convert(tgt, "cxcywh", "xyxy"))  # (M,)
        loss_bbox = F.l1_loss(src, tgt, reduction="none")  # (M, 4)
        if pair_mask is not None:
            # where, not a product: a masked pair's loss cannot reach the sum, even if not finite
            loss_giou = torch.where(pair_mask, loss_giou, 0)
            loss_bbox = torch.where(pair_mask[:, None], loss_bbox, 0)
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _layer_losses(self, outputs, targets, num_boxes: torch.Tensor
                      ) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, num_boxes)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, NQ, K)``, ``pred_boxes`` ``(B, NQ, 4)`` and
                optionally ``aux_outputs``, a list of such dicts for the earlier layers, and
                ``enc_outputs``, such a dict for a two-stage model's encoder proposals.
            targets: per image, ``labels`` ``(N_i,)`` and ``boxes`` ``(N_i, 4)``.

        Returns:
            Unweighted losses: ``loss_ce``, ``loss_bbox``, ``loss_giou``, then the same
            with suffix ``_i`` for auxiliary layer i, and ``_enc`` for the proposals, which
            are matched class-agnostically (every target of class 0), as in Deformable DETR;
            ``_interm`` for ``interm_outputs``, DINO's selected proposals, matched with their
            classes; with ``dn_outputs``, the denoising terms of :meth:`denoising_losses`.
        """
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._layer_losses(aux, targets, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if "dn_outputs" in outputs:
            losses.update(self.denoising_losses(outputs["dn_outputs"], num_boxes))
        if "enc_outputs" in outputs:
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses = self._layer_losses(outputs["enc_outputs"], agnostic, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if "interm_outputs" in outputs:
            interm_losses = self._layer_losses(outputs["interm_outputs"], targets, num_boxes)
            losses.update({f"{k}_interm": v for k, v in interm_losses.items()})
        return losses

    def denoising_losses(self, dn: Dict, num_boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Focal, L1 and GIoU losses of every decoder layer between each denoising query and
        the object it was made from (no matching; padding slots take no part).

        Args:
            dn: ``pred_logits`` ``(L, B, PAD, K)`` and ``pred_boxes`` ``(L, B, PAD, 4)`` of the
                denoising queries, and ``batch_idx``, ``slot``, ``labels``, ``boxes``,
                ``num_groups`` and ``positive`` of
                :class:`~dab_detr.modeling.denoising.DenoisingQueries`.
            num_boxes: the matching loss's normaliser; these terms are divided by it times the
                number of groups (each object is reconstructed once per group).

        Returns:
            ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` of the last layer, and with
            suffix ``_i`` those of layer i < L - 1.
        """
        # the real queries, group-major: (L, G * N, K) and (L, G * N, 4)
        logits = dn["pred_logits"][:, dn["batch_idx"], dn["slot"]]
        boxes = dn["pred_boxes"][:, dn["batch_idx"], dn["slot"]]
        target = [{"labels": dn["labels"], "boxes": dn["boxes"]}]
        identity = torch.arange(len(dn["labels"]), device=logits.device)
        indices = [(identity, identity)]  # query i reconstructs object i
        # contrastive (DINO): only the positives reconstruct their object; the negatives are
        # unmatched, "no object" in the class loss. None: every query is positive.
        positive = dn.get("positive")
        norm = num_boxes * dn["num_groups"]
        layers = len(logits)
        losses = {}
        for layer in range(layers):
            out = {"pred_logits": logits[layer][None], "pred_boxes": boxes[layer][None]}
            terms = self.loss_labels(out, target, indices, norm, positive)
            terms.update(self.loss_boxes(out, target, indices, norm, positive))
            suffix = "_dn" if layer == layers - 1 else f"_dn_{layer}"
            losses.update({k + suffix: v for k, v in terms.items()})
        return losses

    @staticmethod
    def num_boxes(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """``()`` float32 on ``device``: target boxes per worker, averaged over all workers (at
        least 1), so that every worker divides by the same number and gradients match
        single-process training. A tensor, never read on the host: no synchronisation."""
        # filled on the device from a host number (not copied from host memory)
        n = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)


def _flat_indices(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(query_idx, target_idx)`` -> flat ``(batch_idx, query_idx)``."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx
