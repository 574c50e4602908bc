"""What the DETR-style meta-architectures of this project share: Detectron2 inputs (normalised,
padded ``ImageList`` with its padding mask), targets, the training/inference dispatch with the
set losses in float32, and top-k post-processing into ``Instances``.

A subclass passes its backbone and criterion to ``SetPredictionDetector.__init__``, builds its
network, and implements ``forward_predictions``.

Shapes: B batch, NQ queries, K classes. Boxes inside the models are cxcywh normalised by the
size of the (unpadded) input image.
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from ...layers import PositionEmbeddingSine, inverse_sigmoid
from ..criterion import SetCriterion
from ..denoising import DenoisingQueries, make_denoising_queries
from ..matcher import HungarianMatcher

__all__ = [
    "ACTIVATIONS",
    "MultiScaleDetector",
    "SetPredictionDetector",
    "SingleScaleDetector",
    "build_set_criterion",
    "check_depths",
    "check_multi_scale_config",
    "denoising_from_config",
    "init_heads",
    "resize_padding_mask",
    "single_scale_from_config",
    "transformer_from_config",
]

# MODEL.DAB_DETR.ACTIVATION -> the FFN activation
ACTIVATIONS = {"prelu": nn.PReLU, "relu": nn.ReLU, "gelu": nn.GELU}


class SetPredictionDetector(nn.Module):
    """Base of every meta-architecture here (``DABDETR``, ``DABDeformableDETR``, ``DETR``,
    ``ConditionalDETR``, ``DINO``): everything but the network."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        criterion: SetCriterion,
        aux_loss: bool,
        num_select: int,
        pixel_mean: List[float],
        pixel_std: List[float],
    ):
        """
        Args:
            backbone: a Detectron2 backbone.
            criterion: training losses; its ``weight_dict`` weights them.
            aux_loss: also supervise the earlier decoder layers.
            num_select: detections kept per image: top-k over queries x classes (DETR: over
                queries, each with its best class; ``top_detections``).
            pixel_mean, pixel_std: per-channel normalisation, in the input channel order.
        """
        super().__init__()
        self.backbone = backbone
        self.criterion = criterion
        self.aux_loss = aux_loss
        self.num_select = num_select
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    def _init_anchors(self, num_queries: int, query_dim: int, random_refpoints_xy: bool) -> None:
        """The learned anchors ``refpoint_embed`` in inverse-sigmoid space, N(0, 1) as
        ``nn.Embedding`` initialises them; with ``random_refpoints_xy`` (fixxy) the centres
        are drawn uniformly in [0, 1] into the buffer ``refpoint_xy`` instead, so that neither
        gradients nor weight decay move them. They are drawn from their own generator, not the
        global one that Detectron2 seeds differently on each worker: DDP does not broadcast
        buffers, so every worker of a run, and every run, must draw the same centres."""
        if random_refpoints_xy:
            self.refpoint_embed = nn.Embedding(num_queries, query_dim - 2)
            centres = torch.rand(num_queries, 2, generator=torch.Generator().manual_seed(0))
            self.register_buffer("refpoint_xy", inverse_sigmoid(centres))
        else:
            self.refpoint_embed = nn.Embedding(num_queries, query_dim)
            self.refpoint_xy: Optional[torch.Tensor] = None

    def _init_denoising(
        self, denoising: Optional[Dict[str, Any]], num_classes: int, hidden_dim: int
    ) -> None:
        """With ``denoising`` (``num_groups``, ``label_noise``, ``box_noise``), the label
        embedding ``label_enc`` of DN-DETR: ``K + 1`` rows (the last: "no object") of width
        C - 1, the last channel being the indicator bit."""
        self.denoising = denoising
        self.num_classes = num_classes
        if denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)

    def make_denoising(
        self, targets: Optional[List[Dict]], num_matching: int
    ) -> Optional[DenoisingQueries]:
        """The denoising queries of a training batch; None at inference or without DN."""
        if self.denoising is None or not self.training or targets is None:
            return None
        return make_denoising_queries(targets, self.label_enc, num_classes=self.num_classes,
                                      num_matching=num_matching, **self.denoising)

    @staticmethod
    def predictions(
        logits: torch.Tensor,
        boxes: torch.Tensor,
        with_aux: bool,
        dn: Optional[DenoisingQueries] = None,
    ) -> Dict[str, Any]:
        """The criterion's input from every (or the last) decoder layer's predictions.

        Args:
            logits: ``(N, B, T, K)`` of N layers, the last one last.
            boxes: ``(N, B, T, 4)``.
            with_aux: N is every layer: also ``aux_outputs``.
            dn: the denoising queries, the first ``PAD`` of the T.

        Returns:
            ``pred_logits`` ``(B, NQ, K)``, ``pred_boxes`` ``(B, NQ, 4)`` of the matching
            queries, ``aux_outputs`` (a list of such dicts) with ``with_aux``, and with ``dn``
            ``dn_outputs``: the denoising queries' predictions and targets.
        """
        outputs: Dict[str, Any] = {}
        if dn is not None:
            pad = dn.pad_size
            outputs["dn_outputs"] = {
                "pred_logits": logits[:, :, :pad], "pred_boxes": boxes[:, :, :pad],
                "batch_idx": dn.batch_idx, "slot": dn.slot, "labels": dn.labels,
                "boxes": dn.boxes, "num_groups": dn.num_groups, "positive": dn.positive,
            }
            logits, boxes = logits[:, :, pad:], boxes[:, :, pad:]
        outputs.update(pred_logits=logits[-1], pred_boxes=boxes[-1])
        if with_aux:
            outputs["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return outputs

    def anchors(self) -> torch.Tensor:
        """``(Q, D)`` the learned anchors before the sigmoid."""
        if self.refpoint_xy is None:
            return self.refpoint_embed.weight
        return torch.cat([self.refpoint_xy, self.refpoint_embed.weight], dim=1)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and batch the images; padding is zero after normalisation."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def backbone_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """The backbone's maps of normalised images. A backbone that declares
        ``takes_image_sizes`` (DAT: it runs each image alone, so that an image's features do
        not depend on how much padding the batch added) gets ``images.image_sizes`` too."""
        # oneDNN's convolutions are faster on channels-last maps; same results up to rounding
        pixels = images.tensor.contiguous(memory_format=torch.channels_last)
        if getattr(self.backbone, "takes_image_sizes", False):
            return self.backbone(pixels, image_sizes=images.image_sizes)
        return self.backbone(pixels)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """``(B, H, W)`` bool, True where ``images.tensor`` is padding. ``image_sizes`` may
        also be a ``(B, 2)`` tensor of (h, w) (the ONNX export's input)."""
        # (B, 2); to the device without waiting for it (a blocking copy would synchronise)
        sizes = torch.as_tensor(images.image_sizes).to(images.tensor.device, non_blocking=True)
        h, w = images.tensor.shape[-2:]
        rows = torch.arange(h, device=sizes.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(w, device=sizes.device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols

    def forward_predictions(
        self, images: ImageList, with_aux: bool = True, targets: Optional[List[Dict]] = None
    ) -> Dict:
        """``pred_logits`` ``(B, NQ, K)`` and ``pred_boxes`` ``(B, NQ, 4)`` of the last decoder
        layer, with ``with_aux`` also ``aux_outputs`` (one such dict per earlier layer) and
        whatever else the criterion reads; ``targets`` (training) feed denoising queries."""
        raise NotImplementedError

    def losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """The weighted losses of ``outputs`` against ``targets``."""
        # Under autocast (SOLVER.AMP.ENABLED) the network runs in half precision; the
        # matching costs and the set losses are computed in float32.
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            losses = self.criterion(_to_float32(outputs), targets)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts with ``image`` ``(3, H, W)``, and in
                training ``instances`` (``gt_boxes`` XYXY in input pixels, ``gt_classes``).

        Returns:
            In training, the weighted losses. In inference, per image
            ``{"instances": Instances}`` with ``pred_boxes`` (XYXY, original image pixels),
            ``scores`` and ``pred_classes``.
        """
        images = self.preprocess_image(batched_inputs)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            outputs = self.forward_predictions(images, with_aux=self.aux_loss, targets=targets)
            return self.losses(outputs, targets)
        outputs = self.forward_predictions(images, with_aux=False)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"],
                                 images.image_sizes)
        processed = []
        for result, inp, size in zip(results, batched_inputs, images.image_sizes):
            height, width = inp.get("height", size[0]), inp.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image, ``labels`` ``(N,)`` and ``boxes`` ``(N, 4)`` cxcywh normalised by the
        image size."""
        targets = []
        for inp, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = inp["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float).to(self.device,
                                                                     non_blocking=True)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def inference(
        self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: List[tuple]
    ) -> List[Instances]:
        """Top-k over queries x classes of the sigmoid scores.

        Args:
            logits: ``(B, NQ, K)``.
            boxes: ``(B, NQ, 4)`` cxcywh normalised.
            image_sizes: per image ``(h, w)`` of the input (before padding).

        Returns:
            Per image, ``Instances`` of ``num_select`` detections in input pixels.
        """
        scores, classes, boxes = self.top_detections(logits, boxes)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            scale = torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            result.pred_boxes = Boxes(boxes[i] * scale)
            result.scores = scores[i]
            result.pred_classes = classes[i]
            results.append(result)
        return results

    def top_detections(
        self, logits: torch.Tensor, boxes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors of ``inference``: top-k over queries x classes of the sigmoid scores.

        Args:
            logits: ``(B, NQ, K)``.
            boxes: ``(B, NQ, 4)`` cxcywh normalised.

        Returns:
            scores ``(B, S)`` best first, classes ``(B, S)`` int64 and boxes ``(B, S, 4)`` XYXY
            normalised by the image size, ``S = min(num_select, NQ * K)``.
        """
        b, nq, k = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_select, nq * k), dim=1)
        query = torch.div(index, k, rounding_mode="floor")  # (B, S)
        boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        return scores, index % k, box_convert(boxes, "cxcywh", "xyxy")


class SingleScaleDetector(SetPredictionDetector):
    """Base of the detectors on one feature map (DETR, Conditional DETR, DAB-DETR): the
    backbone's ``in_feature`` map projected to the transformer's width by a 1x1 convolution
    (``input_proj``), its padding mask and its sine position encoding."""

    def __init__(
        self,
        *,
        in_feature: str,
        position_embedding: PositionEmbeddingSine,
        hidden_dim: int,
        **kwargs: Any,
    ):
        """
        Args:
            in_feature: the backbone output used.
            position_embedding: sine encoding of the feature-map positions.
            hidden_dim: C, the transformer's width.
            kwargs: those of ``SetPredictionDetector``.
        """
        super().__init__(**kwargs)
        self.in_feature = in_feature
        self.position_embedding = position_embedding
        in_channels = self.backbone.output_shape()[in_feature].channels
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)

    def feature_map(self, images: ImageList) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transformer's inputs from normalised images.

        Returns:
            src ``(B, C, H, W)`` the projected features, mask ``(B, H, W)`` bool (True at
            padding) and pos ``(B, C, H, W)`` the position encoding, in the features' dtype.
        """
        # (channels-last maps: the flattened tokens then need no transposing copy)
        features = self.backbone_features(images)[self.in_feature]
        # The padding mask follows the features down: nearest-neighbour, as in DETR.
        mask = resize_padding_mask(self.padding_mask(images), features.shape[-2:])
        pos = self.position_embedding(mask).to(features.dtype)
        return self.input_proj(features), mask, pos


class MultiScaleDetector(SetPredictionDetector):
    """Base of the detectors on several feature maps (DAB-Deformable-DETR, DINO): the
    backbone's ``in_features`` maps, each projected to the transformer's width by a 1x1
    convolution + GroupNorm(32), and the levels beyond the backbone's made by a 3x3 stride-2
    convolution + GroupNorm(32) of the last backbone map (the first extra level) or of the
    previous level (``input_proj``); each level's padding mask and sine position encoding."""

    def __init__(
        self,
        *,
        in_features: List[str],
        position_embedding: PositionEmbeddingSine,
        transformer: nn.Module,
        **kwargs: Any,
    ):
        """
        Args:
            in_features: the backbone outputs used, the first levels, finest first.
            position_embedding: sine encoding of each level's positions.
            transformer: reads the levels; its ``d_model`` is the width C and its
                ``level_embed`` ``(L, C)`` gives the number of levels L.
            kwargs: those of ``SetPredictionDetector``.
        """
        super().__init__(**kwargs)
        self.in_features = in_features
        self.position_embedding = position_embedding
        self.transformer = transformer
        shapes = self.backbone.output_shape()
        in_channels = [shapes[f].channels for f in in_features]
        hidden_dim, num_levels = transformer.d_model, transformer.level_embed.shape[0]
        projections = []
        for level in range(num_levels):
            if level < len(in_channels):
                conv = nn.Conv2d(in_channels[level], hidden_dim, kernel_size=1)
            else:
                channels = in_channels[-1] if level == len(in_channels) else hidden_dim
                conv = nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            projections.append(nn.Sequential(conv, nn.GroupNorm(32, hidden_dim)))
        self.input_proj = nn.ModuleList(projections)

    def multi_scale_inputs(
        self, images: ImageList
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """The L levels the transformer reads: projected maps ``(B, C, H_l, W_l)``, padding
        masks ``(B, H_l, W_l)`` (the image's, resized nearest-neighbour as in DETR, the extra
        levels' too) and position encodings ``(B, C, H_l, W_l)`` (float32 computed, then in
        the maps' dtype)."""
        features = self.backbone_features(images)
        image_mask = self.padding_mask(images)  # (B, H, W)
        srcs, masks, pos = [], [], []
        for level, proj in enumerate(self.input_proj):
            if level < len(self.in_features):
                src = proj(features[self.in_features[level]])
            elif level == len(self.in_features):
                src = proj(features[self.in_features[-1]])
            else:
                src = proj(srcs[-1])
            mask = resize_padding_mask(image_mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.position_embedding(mask).to(src.dtype))
        return srcs, masks, pos


def resize_padding_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A padding mask resized nearest-neighbour to a feature map's size, as DETR resizes it
    (``F.interpolate``'s default mode, whose results these are).

    Written out because ONNX's Resize computes the source pixel as ``i / (h / H)`` where
    PyTorch computes ``i * (H / h)``: in float32 the first can fall one pixel short where
    ``i * H / h`` is a whole number (onnxruntime's ``6 / (10 / 150)`` is 89.99999, PyTorch's
    ``6 * 15`` is 90), which moves the edge of the padding in an exported graph.

    Args:
        mask: ``(B, H, W)`` bool, True at padding.
        size: ``(h, w)`` of the feature map.

    Returns:
        ``(B, h, w)`` bool: pixel ``(i, j)`` is ``mask``'s
        ``(floor(i * (H / h)), floor(j * (W / w)))``, the ratios in float32.
    """
    rows = _nearest_sources(mask.shape[1], size[0], mask.device)
    cols = _nearest_sources(mask.shape[2], size[1], mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


def _nearest_sources(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out,)`` the input index of each output index in PyTorch's nearest resize
    (``nearest_idx`` of ATen's UpSample.h): ``min(floor(i * (n_in / n_out)), n_in - 1)``."""
    # float32 arange times a Python float: the product is float32, the scale rounded to the
    # float32 quotient ATen uses (a double rounded to float32 is that quotient for any
    # n_out < 2 ** 24)
    scale = n_in / n_out
    index = (torch.arange(n_out, dtype=torch.float32, device=device) * scale).floor()
    return index.long().clamp(max=n_in - 1)


def _to_float32(outputs):
    """``outputs`` (tensors in dicts and lists) with half-precision tensors in float32 (float32
    and float64 ones as they are)."""
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float32(v) for v in outputs]
    if torch.is_tensor(outputs) and outputs.dtype in (torch.float16, torch.bfloat16):
        return outputs.float()
    return outputs


def init_heads(class_heads: List[nn.Linear], box_heads: List[nn.Module]) -> None:
    """The heads' initialisation of DAB-DETR and Deformable DETR: every class starts at
    probability 0.01 (the focal-loss prior), every box head predicts a zero delta (its last
    layer zero), so that training starts from the anchors."""
    for head in class_heads:
        nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    for head in box_heads:
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)


def build_set_criterion(
    cfg: CfgNode, extra_suffixes: List[str] = (), no_object_class: bool = False
) -> SetCriterion:
    """The matcher and criterion of ``MODEL.DAB_DETR``: focal, L1 and GIoU terms weighted by
    ``CLASS_WEIGHT``, ``BBOX_WEIGHT``, ``GIOU_WEIGHT`` for the last decoder layer and, with
    ``AUX_LOSS``, every earlier one (``loss_ce_0``, ...), and for each of ``extra_suffixes``
    (e.g. ``"enc"``: the two-stage proposals' ``loss_ce_enc``, ...). With ``DN.ENABLED``, the
    denoising terms of every layer (``loss_ce_dn``, ``loss_ce_dn_0``, ...) weigh the same as
    the matching ones, as in DN-DETR. ``no_object_class`` (DETR): softmax over K + 1 classes,
    "no object" weighted ``NO_OBJECT_WEIGHT``, in the loss and in the matching cost."""
    d = cfg.MODEL.DAB_DETR
    matcher = HungarianMatcher(
        d.SET_COST_CLASS, d.SET_COST_BBOX, d.SET_COST_GIOU, d.FOCAL_ALPHA, d.FOCAL_GAMMA,
        softmax=no_object_class,
    )
    base = {"loss_ce": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT, "loss_giou": d.GIOU_WEIGHT}
    layers = [str(i) for i in range(d.DEC_LAYERS - 1)] if d.AUX_LOSS else []
    suffixes = layers + list(extra_suffixes)
    if d.DN.ENABLED:
        suffixes += ["dn"] + [f"dn_{i}" for i in layers]
    weights = dict(base)
    weights.update({f"{k}_{s}": w for s in suffixes for k, w in base.items()})
    return SetCriterion(d.NUM_CLASSES, matcher, weights, d.FOCAL_ALPHA, d.FOCAL_GAMMA,
                        no_object_weight=d.NO_OBJECT_WEIGHT if no_object_class else None)


def denoising_from_config(cfg: CfgNode) -> Optional[Dict[str, Any]]:
    """``MODEL.DAB_DETR.DN`` as the keyword arguments of ``make_denoising_queries``, or None
    when it is off."""
    dn = cfg.MODEL.DAB_DETR.DN
    if not dn.ENABLED:
        return None
    if dn.NUM_GROUPS < 1 or not 0 <= dn.LABEL_NOISE <= 1 or dn.BOX_NOISE < 0:
        raise ValueError(
            f"MODEL.DAB_DETR.DN: NUM_GROUPS={dn.NUM_GROUPS} (needs >= 1), "
            f"LABEL_NOISE={dn.LABEL_NOISE} (needs [0, 1]), BOX_NOISE={dn.BOX_NOISE} (needs >= 0)"
        )
    return {"num_groups": dn.NUM_GROUPS, "label_noise": dn.LABEL_NOISE,
            "box_noise": dn.BOX_NOISE}


def check_depths(cfg: CfgNode) -> None:
    """Refuse layer counts the transformers cannot have, naming the keys: any number of
    encoder layers (0: the decoder attends to the projected backbone map), at least one
    decoder layer."""
    d = cfg.MODEL.DAB_DETR
    for key, value, least in (("ENC_LAYERS", d.ENC_LAYERS, 0), ("DEC_LAYERS", d.DEC_LAYERS, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"MODEL.DAB_DETR.{key}={value!r}; expected an integer >= {least}")


def check_multi_scale_config(cfg: CfgNode, model: str) -> None:
    """Refuse what no multi-scale detector (``model`` names it in errors) can be built with,
    naming the keys: a backbone map count outside 1 to ``DEFORMABLE.NUM_FEATURE_LEVELS``, layer
    counts ``check_depths`` refuses, an unknown activation, a width that is not a multiple of
    the heads and of the input projections' GroupNorm(32)."""
    d = cfg.MODEL.DAB_DETR
    levels = d.DEFORMABLE.NUM_FEATURE_LEVELS
    if not 1 <= len(cfg.MODEL.RESNETS.OUT_FEATURES) <= levels:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={list(cfg.MODEL.RESNETS.OUT_FEATURES)}: {model} needs "
            f"1 to MODEL.DAB_DETR.DEFORMABLE.NUM_FEATURE_LEVELS ({levels}) backbone maps"
        )
    check_depths(cfg)
    if d.ACTIVATION not in ACTIVATIONS:
        raise ValueError(f"MODEL.DAB_DETR.ACTIVATION={d.ACTIVATION!r}; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    if d.HIDDEN_DIM % d.NHEADS:
        raise ValueError(f"MODEL.DAB_DETR.HIDDEN_DIM={d.HIDDEN_DIM} must be a multiple of "
                         f"MODEL.DAB_DETR.NHEADS={d.NHEADS}")
    if d.HIDDEN_DIM % 32:
        raise ValueError(f"MODEL.DAB_DETR.HIDDEN_DIM={d.HIDDEN_DIM}: the input projections' "
                         "GroupNorm(32) needs a multiple of 32")


def single_scale_from_config(cfg: CfgNode, model: str) -> Dict[str, Any]:
    """What every single-map detector reads from ``cfg`` (``model`` names it in errors): its
    backbone and ``in_feature``, the position encoding (``PE_TEMPERATURE_H/W``), ``aux_loss``,
    ``num_select`` and the pixel normalisation; the layer counts and the activation checked."""
    d = cfg.MODEL.DAB_DETR
    backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    in_features = cfg.MODEL.RESNETS.OUT_FEATURES
    if len(in_features) != 1:
        raise ValueError(f"MODEL.RESNETS.OUT_FEATURES={in_features}: {model} uses one map")
    check_depths(cfg)
    if d.ACTIVATION not in ACTIVATIONS:
        raise ValueError(f"MODEL.DAB_DETR.ACTIVATION={d.ACTIVATION!r}; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    return {
        "backbone": backbone,
        "in_feature": in_features[0],
        "position_embedding": PositionEmbeddingSine(
            d.HIDDEN_DIM // 2, d.PE_TEMPERATURE_H, d.PE_TEMPERATURE_W
        ),
        "aux_loss": d.AUX_LOSS,
        "num_select": d.NUM_SELECT,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }


def transformer_from_config(cfg: CfgNode) -> Dict[str, Any]:
    """The arguments every single-map transformer (DAB-DETR's, DETR's) takes from
    ``MODEL.DAB_DETR``: width, heads, depths, FFN width, dropout and activation."""
    d = cfg.MODEL.DAB_DETR
    return {
        "d_model": d.HIDDEN_DIM,
        "nhead": d.NHEADS,
        "num_encoder_layers": d.ENC_LAYERS,
        "num_decoder_layers": d.DEC_LAYERS,
        "dim_feedforward": d.DIM_FEEDFORWARD,
        "dropout": d.DROPOUT,
        "activation": ACTIVATIONS[d.ACTIVATION],
    }
