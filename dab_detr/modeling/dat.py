"""DAT, the Deformable Attention Transformer (Xia et al., CVPR 2022), as a feature extractor.

A hierarchical vision transformer in four stages (strides 4, 8, 16, 32), built as the
official code's ``models/dat.py`` at tag ``CVPR2022`` builds it: a 4x4 stride-4 patch
embedding and LayerNorm; in each stage, pre-norm blocks ``x + attn(LN(x))``,
``x + mlp(LN(x))``, whose attention is local (``L``, windows), shifted-window (``S``) or
deformable (``D``, :class:`~dab_detr.layers.DATAttention`); between stages a 2x2 stride-2
convolution without bias and LayerNorm. The detection models read each stage's output through
a LayerNorm of its own, as DAT's detection code does.

Plain PyTorch: ``meta_arch/backbone.py`` makes it a Detectron2 backbone.

Shapes: B batch, H x W map, C channels; maps inside the stages are channels-last
``(B, H, W, C)``, the outputs ``(B, C, H, W)``.
"""

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from ..layers.dat_attention import DATAttention
from ..layers.window_attention import WindowAttention

__all__ = ["DAT", "DAT_SIZES", "DATSize", "recorded_deformed_points", "stage_blocks"]


@dataclass(frozen=True)
class DATSize:
    """A released model's architecture (the official ``configs/dat_*.yaml``)."""

    dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    heads: Tuple[int, ...]
    groups: Tuple[int, ...]  # offset groups of the deformable blocks (stages 3-4)


# stages 1-2 alternate local and shifted windows, stages 3-4 local windows and deformable
# attention; window 7, offset range factor 2, offset kernels 9-7-5-3 by stage, in all three
STAGE_SPEC = ("LS", "LS", "LD", "LD")
DAT_SIZES: Dict[str, DATSize] = {
    "T": DATSize((96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24), (1, 1, 3, 6)),
    "S": DATSize((96, 192, 384, 768), (2, 2, 18, 2), (3, 6, 12, 24), (1, 1, 3, 6)),
    "B": DATSize((128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32), (1, 1, 4, 8)),
}


def stage_blocks(pattern: str, depth: int) -> str:
    """The block kinds of a stage: ``pattern`` (e.g. ``"LD"``) repeated to ``depth``."""
    if not pattern or set(pattern) - set("LSD"):
        raise ValueError(f"stage pattern {pattern!r}: expected letters L, S and D")
    return (pattern * depth)[:depth]


class DATBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (MLP: Linear, GELU, Linear, 4x
    wide), each branch dropped per sample with probability ``drop_path``."""

    def __init__(self, dim: int, attn: nn.Module, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchConv(nn.Module):
    """A strided convolution (kernel = stride) and LayerNorm: the patch embedding and the
    down-sampling between stages (``proj``, ``norm``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, stride, stride, bias=bias)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H / s, W / s, C')`` channels-last."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class DAT(nn.Module):
    """DAT's four stages and the LayerNorms of the stages it outputs.

    Submodules: ``stem`` (patch embedding), ``stages`` (a ``ModuleList`` of ``ModuleList``s
    of :class:`DATBlock`), ``downsamples``, ``out_norms`` (``ModuleDict`` by stage index).
    """

    def __init__(
        self,
        *,
        size: DATSize,
        out_indices: Sequence[int] = (1, 2, 3),
        stage_spec: Sequence[str] = STAGE_SPEC,
        window_size: int = 7,
        kernel_sizes: Sequence[int] = (9, 7, 5, 3),
        offset_range_factor: float = 2.0,
        pretrain_size: int = 224,
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
    ):
        """
        Args:
            size: the widths, depths, heads and offset groups of the stages.
            out_indices: the stages (0-3) whose outputs ``forward`` returns.
            stage_spec: each stage's block kinds, repeated to its depth.
            window_size: the windows of ``L`` and ``S`` blocks (``S`` shift: half, rounded up).
            kernel_sizes: the offset networks' depthwise kernels, by stage.
            offset_range_factor: deformable offsets are at most this many cells.
            pretrain_size: the (square) image size the position-bias tables are learned for.
            drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
            in_channels: the image's channels.
        """
        super().__init__()
        if not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices {list(out_indices)}: expected stages 0 to 3")
        self.out_indices = sorted(out_indices)
        self.dims = size.dims
        self.stem = PatchConv(in_channels, size.dims[0], 4, bias=True)
        self.downsamples = nn.ModuleList(
            PatchConv(size.dims[i], size.dims[i + 1], 2, bias=False) for i in range(3))
        rates = torch.linspace(0, drop_path_rate, sum(size.depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(size.dims, size.depths, size.heads)):
            table = pretrain_size // 4 // 2**i
            kinds = stage_blocks(stage_spec[i], depth)
            attns = [self._attention(kind, dim, heads, size.groups[i], window_size,
                                     kernel_sizes[i], offset_range_factor, table)
                     for kind in kinds]
            first = sum(size.depths[:i])
            self.stages.append(nn.ModuleList(
                DATBlock(dim, attn, rates[first + j]) for j, attn in enumerate(attns)))
        self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(size.dims[i])
                                        for i in self.out_indices})

    @staticmethod
    def _attention(kind: str, dim: int, heads: int, groups: int, window: int, kernel: int,
                   factor: float, table: int) -> nn.Module:
        if kind == "D":
            return DATAttention(dim, heads, groups, kernel, factor, (table, table))
        return WindowAttention(dim, heads, window, shift=(window + 1) // 2 if kind == "S" else 0)

    def stage_outputs(self, x: torch.Tensor, until: int = 3) -> List[torch.Tensor]:
        """The stages' outputs ``(B, H_s, W_s, C_s)`` before the output norms, stages 0 to
        ``until``: what the official ``DAT.forward`` computes before ``down_projs``."""
        x = self.stem(x)
        outputs = []
        for i in range(until + 1):
            if i:
                x = self.downsamples[i - 1](x.permute(0, 3, 1, 2))
            for block in self.stages[i]:
                x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> Dict[int, torch.Tensor]:
        """``x`` ``(B, 3, H, W)`` normalised -> ``{stage: (B, C_s, H_s, W_s)}`` for
        ``out_indices``, each through its LayerNorm; ``H_s = H / 2^(s + 2)`` rounded down
        (the sides should be multiples of 32)."""
        outputs = self.stage_outputs(x, self.out_indices[-1])
        return {i: self.out_norms[str(i)](outputs[i]).permute(0, 3, 1, 2)
                for i in self.out_indices}


@contextlib.contextmanager
def recorded_deformed_points(model: DAT) -> Iterator[Dict[Tuple[int, int], torch.Tensor]]:
    """While the block runs, ``{(stage, block): (B, G, H, W, 2)}``: the deformed points
    ``(y, x)`` in [-1, 1] (``align_corners`` convention) of every deformable block that runs,
    for pictures (the paper's Fig. 6)."""
    points: Dict[Tuple[int, int], torch.Tensor] = {}
    handles = []
    for s, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            if isinstance(block.attn, DATAttention):
                def record(module: DATAttention, args: Tuple[torch.Tensor], key=(s, j)) -> None:
                    with torch.no_grad():
                        points[key] = module.sampling_locations(module.proj_q(args[0]))

                handles.append(block.attn.register_forward_pre_hook(record))
    try:
        yield points
    finally:
        for handle in handles:
            handle.remove()
