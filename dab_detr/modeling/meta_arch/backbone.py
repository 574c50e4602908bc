"""ResNet backbone with torchvision's DC5 layout.

Detectron2's ``build_resnet_backbone`` dilates every block of res5 when
``MODEL.RESNETS.RES5_DILATION = 2``; torchvision (and so DETR, DAB-DETR and their released
DC5 checkpoints) keeps the first res5 block undilated and dilates the others. This builder
is Detectron2's ResNet with torchvision's choice, so that DC5 checkpoints convert exactly.
Without dilation it builds the same network as ``build_resnet_backbone``.
"""

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = ["build_dab_detr_resnet_backbone"]

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
