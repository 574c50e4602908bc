"""The backbones registered in Detectron2's ``BACKBONE_REGISTRY``: a ResNet with torchvision's
DC5 layout, and DAT (``build_dat_backbone``).

Detectron2's ``build_resnet_backbone`` dilates every block of res5 when
``MODEL.RESNETS.RES5_DILATION = 2``; torchvision (and so DETR, DAB-DETR and their released
DC5 checkpoints) keeps the first res5 block undilated and dilates the others. This builder
is Detectron2's ResNet with torchvision's choice, so that DC5 checkpoints convert exactly.
Without dilation it builds the same network as ``build_resnet_backbone``.
"""

import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from ..dat import DAT, DATSize

__all__ = ["DATBackbone", "build_dab_detr_resnet_backbone", "build_dat_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                     152: [3, 8, 36, 3]}


@BACKBONE_REGISTRY.register()
def build_dab_detr_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """ResNet from ``MODEL.RESNETS`` (deformable convolutions are not supported)."""
    r = cfg.MODEL.RESNETS
    depth, res5_dilation = r.DEPTH, r.RES5_DILATION
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth}; expected one of {list(_BLOCKS_PER_STAGE)}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res5_dilation}; expected 1 or 2")
    if depth in (18, 34) and res5_dilation != 1:
        # BasicBlock has no dilation: res5 would lose its stride without dilating
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res5_dilation} needs DEPTH >= 50")
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported by this backbone")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        dilated = idx == 3 and res5_dilation == 2
        first_stride = 1 if idx == 0 or dilated else 2
        kwargs = dict(
            num_blocks=num_blocks,
            in_channels=in_channels,
            out_channels=out_channels,
            norm=r.NORM,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
        )
        if depth in (18, 34):
            kwargs["block_class"] = BasicBlock
        else:
            # torchvision: the block that would have strided keeps dilation 1
            dilations = [1] + [res5_dilation] * (num_blocks - 1) if dilated else [1] * num_blocks
            kwargs.update(
                block_class=BottleneckBlock,
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=r.STRIDE_IN_1X1,
                num_groups=r.NUM_GROUPS,
                dilation_per_block=dilations,
            )
        stages.append(ResNet.make_stage(**kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


class DATBackbone(Backbone):
    """DAT (:class:`~dab_detr.modeling.dat.DAT`, as ``body``) with Detectron2's interface: the
    stages' maps as ``res2`` to ``res5`` (strides 4 to 32), each through its LayerNorm.

    Given ``image_sizes`` (the detectors pass them: ``takes_image_sizes``), each image runs
    alone on its own area padded to a multiple of 32, and its maps are placed into the batch's:
    DAT's deformable attention spreads its reference points over the whole map and its
    shifted windows wrap around it, so a batch run would make an image's features depend on
    how much padding the other images brought. Images of one padded size run together.
    """

    takes_image_sizes = True

    def __init__(self, body: DAT, freeze_at: int = 0):
        super().__init__()
        self.body = body
        self._names = {i: f"res{i + 2}" for i in body.out_indices}
        self._out_feature_channels = {self._names[i]: body.dims[i] for i in body.out_indices}
        self._out_feature_strides = {self._names[i]: 4 * 2**i for i in body.out_indices}
        self._out_features = list(self._out_feature_channels)
        self.freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return 32

    def freeze(self, freeze_at: int) -> None:
        """Freeze the patch embedding (``freeze_at`` >= 1) and the stages before
        ``freeze_at`` (2: stage 1 "res2" too; 3: the first down-sampling and stage 2; ...)."""
        frozen = [self.body.stem] if freeze_at >= 1 else []
        for i in range(min(freeze_at - 1, 4)):
            frozen += [self.body.stages[i]] + ([self.body.downsamples[i - 1]] if i else [])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self._frozen = frozen

    def train(self, mode: bool = True) -> "DATBackbone":
        """Frozen stages stay in eval mode: no stochastic depth in them."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(
        self, x: torch.Tensor,
        image_sizes: Optional[Union[Sequence[Tuple[int, int]], torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: ``(B, 3, H, W)`` normalised images, H and W multiples of 32.
            image_sizes: ``(h, w)`` of each image before padding. None, or a tensor (the ONNX
                export's input): the batch runs as one.

        Returns:
            ``{"res<s + 2>": (B, C_s, H / 2^(s + 2), W / 2^(s + 2))}``, zero outside each
            image's padded area.
        """
        if image_sizes is None or torch.is_tensor(image_sizes):
            outputs = self.body(x)
        else:
            outputs = self._per_image(x, image_sizes)
        return {self._names[i]: out for i, out in outputs.items()}

    def _per_image(self, x: torch.Tensor,
                   image_sizes: Sequence[Tuple[int, int]]) -> Dict[int, torch.Tensor]:
        groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for i, (h, w) in enumerate(image_sizes):  # padded to 32, as a batch of one would be
            groups[(math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)].append(i)
        if list(groups) == [tuple(x.shape[-2:])]:
            return self.body(x)
        b, _, height, width = x.shape
        outputs = {i: x.new_zeros(b, self.body.dims[i], height // 4 // 2**i, width // 4 // 2**i)
                   for i in self.body.out_indices}
        for (h, w), members in groups.items():
            index = torch.tensor(members).to(x.device, non_blocking=True)  # no host sync
            maps = self.body(x[index, :, :h, :w])
            for i, out in maps.items():
                # index_put, not slicing in place, so that autograd sees a plain function
                outputs[i] = outputs[i].index_put(
                    (index,), F.pad(out, (0, outputs[i].shape[-1] - out.shape[-1],
                                          0, outputs[i].shape[-2] - out.shape[-2])))
        return outputs


@BACKBONE_REGISTRY.register()
def build_dat_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> DATBackbone:
    """DAT from ``MODEL.DAT`` (its outputs: ``MODEL.DAT.OUT_FEATURES``, else the detector's
    ``MODEL.RESNETS.OUT_FEATURES``), frozen up to ``MODEL.BACKBONE.FREEZE_AT``."""
    d = cfg.MODEL.DAT
    lists = {"DIMS": d.DIMS, "DEPTHS": d.DEPTHS, "HEADS": d.HEADS, "GROUPS": d.GROUPS,
             "STAGE_SPEC": d.STAGE_SPEC, "KERNEL_SIZES": d.KERNEL_SIZES}
    for key, value in lists.items():
        if len(value) != 4:
            raise ValueError(f"MODEL.DAT.{key}={list(value)}: expected one value per stage (4)")
    names = list(d.OUT_FEATURES) or list(cfg.MODEL.RESNETS.OUT_FEATURES)
    stages = {f"res{i + 2}": i for i in range(4)}
    unknown = [n for n in names if n not in stages]
    if unknown or not names:
        raise ValueError(f"DAT's outputs {names} (MODEL.DAT.OUT_FEATURES, else "
                         f"MODEL.RESNETS.OUT_FEATURES): expected some of {list(stages)}")
    for i, (dim, heads, groups) in enumerate(zip(d.DIMS, d.HEADS, d.GROUPS)):
        if dim % heads or heads % groups:
            raise ValueError(f"MODEL.DAT: stage {i + 1} has DIMS {dim}, HEADS {heads}, GROUPS "
                             f"{groups}; expected heads dividing the width, groups the heads")
    body = DAT(
        size=DATSize(tuple(d.DIMS), tuple(d.DEPTHS), tuple(d.HEADS), tuple(d.GROUPS)),
        out_indices=[stages[n] for n in names],
        stage_spec=list(d.STAGE_SPEC),
        window_size=d.WINDOW_SIZE,
        kernel_sizes=list(d.KERNEL_SIZES),
        offset_range_factor=d.OFFSET_RANGE_FACTOR,
        pretrain_size=d.PRETRAIN_IMG_SIZE,
        drop_path_rate=d.DROP_PATH_RATE,
        in_channels=input_shape.channels,
    )
    return DATBackbone(body, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
