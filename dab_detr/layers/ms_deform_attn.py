"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021).

Each query attends, in each head and at each feature level, to a few points sampled
bilinearly around a reference point, at offsets predicted from the query, and averages them
with weights also predicted from the query (softmax over levels and points together).
``multi_scale_deformable_attention`` is the sampling and weighting step, one boundary with
three implementations (``IMPLEMENTATIONS``; the config key MODEL.DAB_DETR.DEFORMABLE_ATTENTION):
``"pytorch"``, one ``grid_sample`` per level, the reference; ``"light"``
(``ms_deform_attn_light.py``), plain PyTorch that keeps no samples for the backward pass and
is the faster CPU path; ``"triton"`` (``ms_deform_attn_triton.py``), fused GPU kernels; and
``"auto"``: Triton on CUDA when it imports, else the light function. ``MSDeformAttn`` adds the
projections; its submodules are named as in the official implementation so that official
checkpoints load by name.

Under ``torch.autocast`` the sampling locations and the attention weights are computed in
float32 (a half-precision location is off by a pixel on a 256-pixel map); the value, a
projection, may be half precision.

Shapes: B batch, Q queries, C channels (d_model), h heads, d = C / h channels per head,
L levels, P sampling points per head and level, H_l x W_l the size of level l,
S = sum_l H_l * W_l tokens, flattened level by level, each level row-major.
Locations are normalised (x, y): (0, 0) the top-left corner of a map, (1, 1) its
bottom-right corner (padding area included).
"""

import functools
import importlib
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_light import light_deformable_attention
from .ms_deform_attn_pytorch import grid_sample_deformable_attention

__all__ = [
    "IMPLEMENTATIONS",
    "MSDeformAttn",
    "SpatialShapes",
    "level_shapes",
    "multi_scale_deformable_attention",
    "resolve_implementation",
]

# ``(H_l, W_l)`` of each level: an ``(L, 2)`` long tensor (the official signature), or L pairs
# of Python ints. The pairs, taken from the maps' shapes, need no device-to-host copy and stay
# symbolic under torch.export (a tensor's ``tolist()`` would make the export's sizes constant).
SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]

# the values of MODEL.DAB_DETR.DEFORMABLE_ATTENTION (see the module's docstring)
IMPLEMENTATIONS = ("auto", "pytorch", "light", "triton")
_KEY = "MODEL.DAB_DETR.DEFORMABLE_ATTENTION"


def level_shapes(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """``spatial_shapes`` as a list of ``(H_l, W_l)`` Python ints (from a tensor: a device sync
    when it lives on GPU)."""
    if torch.is_tensor(spatial_shapes):
        return [(int(hl), int(wl)) for hl, wl in spatial_shapes.tolist()]
    return [(hl, wl) for hl, wl in spatial_shapes]


def _shapes_tensor(spatial_shapes: SpatialShapes, like: torch.Tensor) -> torch.Tensor:
    """``(L, 2)`` ``(H_l, W_l)`` in the dtype and on the device of ``like``."""
    if torch.is_tensor(spatial_shapes):
        return spatial_shapes.to(like)
    # torch.tensor, not as_tensor: the latter makes symbolic sizes constant under torch.export
    # (made on the host, copied without waiting: a blocking copy would synchronise)
    return torch.tensor(list(spatial_shapes), dtype=like.dtype).to(like.device,
                                                                   non_blocking=True)


def _exporting() -> bool:
    """Whether the graph is being captured for export (ONNX, TorchScript): the reference's
    operators export, the other implementations' do not."""
    # torch.compiler.is_exporting: torch >= 2.3 (torch.export, the ONNX exporter's capture)
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", lambda: False)
    return (is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
            or torch.jit.is_scripting())


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    """None if the Triton kernels import, else why not (``triton`` missing, too old, or
    failing on this machine: "auto" then takes the light function)."""
    try:
        # by its full name, as the call below imports it (``from . import`` would accept the
        # package's attribute left by an earlier import)
        importlib.import_module(f"{__package__}.ms_deform_attn_triton")
    except Exception as e:  # any failure of triton's import means no kernels
        return f"{type(e).__name__}: {e}"
    return None


def resolve_implementation(implementation: str, value: torch.Tensor) -> str:
    """The implementation that computes the attention of ``value``: ``implementation`` itself,
    ``"auto"`` resolved (``"triton"`` for a CUDA value when the kernels import, else
    ``"light"``), and ``"pytorch"`` while exporting.

    Raises:
        ValueError: an unknown ``implementation``, or ``"triton"`` where it cannot run
            (without ``triton``, or on a CPU value outside Triton's interpreter).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{_KEY}={implementation!r}: expected one of {list(IMPLEMENTATIONS)}")
    if _exporting():
        return "pytorch"
    if implementation == "auto":
        return "triton" if value.is_cuda and _triton_import_error() is None else "light"
    if implementation == "triton":
        error = _triton_import_error()
        if error is not None:
            raise ValueError(f"{_KEY}='triton' needs the triton package (pip install triton; "
                             f"torch's CUDA wheels bring it), which failed to import: {error}")
        if not value.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{_KEY}='triton' needs CUDA tensors, got a {value.device.type} "
                             "value: use 'auto', 'light' or 'pytorch' (or run the kernels in "
                             "Triton's interpreter: TRITON_INTERPRET=1 before importing triton)")
    return implementation


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    implementation: str = "pytorch",
) -> torch.Tensor:
    """Weighted sum of values sampled bilinearly at the given locations, level by level.

    The semantics of Deformable DETR's ``ms_deform_attn_core_pytorch`` (and of its CUDA
    kernel): ``F.grid_sample`` with ``align_corners=False``, so that location ``x`` falls on
    pixel coordinate ``x * W_l - 0.5``, and zeros outside the map. Every implementation
    computes this, and its gradients, in the wider of the value's and the locations' dtypes
    (Triton: float32).

    Args:
        value: ``(B, S, h, d)``, the tokens of all levels; may be half precision.
        spatial_shapes: ``(H_l, W_l)`` per level (``SpatialShapes``).
        sampling_locations: ``(B, Q, h, L, P, 2)``, normalised ``(x, y)``, usually in [0, 1];
            points outside sample zeros there.
        attention_weights: ``(B, Q, h, L, P)``, already normalised (softmax over L * P).
        implementation: one of ``IMPLEMENTATIONS`` (see ``resolve_implementation``).

    Returns:
        ``(B, Q, h * d)``: the heads' outputs concatenated, in the value's dtype.
    """
    # every implementation needs the sizes as Python ints
    shapes = level_shapes(spatial_shapes)
    sizes = [hl * wl for hl, wl in shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {shapes} make {sum(sizes)} tokens, "
                         f"value has {value.shape[1]}")
    name = resolve_implementation(implementation, value)
    if name == "light":
        return light_deformable_attention(value, shapes, sampling_locations, attention_weights)
    if name == "triton":
        from .ms_deform_attn_triton import triton_deformable_attention
        return triton_deformable_attention(value, shapes, sampling_locations, attention_weights)
    return grid_sample_deformable_attention(value, shapes, sampling_locations,
                                            attention_weights)


def _linear(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``layer(x)`` computed in ``dtype`` (gradients reach the layer's own parameters)."""
    return F.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections.

    Args:
        d_model: C, the query and input width; divisible by ``n_heads``.
        n_levels: L, the number of feature levels.
        n_heads: h, the number of heads.
        n_points: P, the sampling points per head and level.
        implementation: which implementation computes the sampling (``IMPLEMENTATIONS``,
            see ``multi_scale_deformable_attention``); all compute the same function.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"{_KEY}={implementation!r}: expected one of "
                             f"{list(IMPLEMENTATIONS)}")
        self.implementation = implementation
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The official initialisation: before training, head k samples along direction
        ``2 pi k / h``, point i at ``i + 1`` steps (a step being one pixel of each level for
        2-d references), and all points weigh the same."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        # (h, 2) directions, scaled so that their largest component is +-1 (a square's edge)
        directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # (h, 1, 1, 2) * (P, 1) -> (h, 1, P, 2) -> (h, L, P, 2): the layout of forward's view
        grid = (directions[:, None, None, :] * steps[:, None]).repeat(1, self.n_levels, 1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling_locations_and_weights(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Where each query samples and how much each sample weighs (what ``forward`` feeds
        ``multi_scale_deformable_attention``; public so that pictures can show it).

        Args:
            query, reference_points: as in ``forward``.
            spatial_shapes: ``(H_l, W_l)`` per level (``SpatialShapes``).

        Returns:
            locations: ``(B, Q, h, L, P, 2)`` normalised ``(x, y)`` in each level's padded map.
            weights: ``(B, Q, h, L, P)``, summing to 1 over L * P per query and head.

        Raises:
            ValueError: if the last dimension of ``reference_points`` is not 2 or 4.
        """
        b, q, _ = query.shape
        h, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        # float32 at least, autocast or not: half-precision offsets and logits would move the
        # points by a fraction of a pixel and the weights by a fraction of a percent
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            # (B, Q, h * L * P * 2) -> (B, Q, h, L, P, 2)
            offsets = _linear(self.sampling_offsets, query, dtype).view(
                b, q, h, n_levels, n_points, 2)
            # (B, Q, h * L * P) -> (B, Q, h, L * P): one softmax over all levels and points
            weights = _linear(self.attention_weights, query, dtype).view(
                b, q, h, n_levels * n_points)
            # (B, Q, h, L * P) -> (B, Q, h, L, P)
            weights = weights.softmax(dim=-1).view(b, q, h, n_levels, n_points)
            locations = self._locations(offsets, reference_points.to(dtype), spatial_shapes)
        return locations, weights

    def _locations(self, offsets: torch.Tensor, reference_points: torch.Tensor,
                   spatial_shapes: SpatialShapes) -> torch.Tensor:
        """``(B, Q, h, L, P, 2)`` locations from the ``(B, Q, h, L, P, 2)`` offsets and the
        ``(B, Q, L, 2 or 4)`` reference points (see ``forward``)."""
        if reference_points.shape[-1] == 2:
            # (L, 2) (H_l, W_l) -> (W_l, H_l), the (x, y) order of the offsets
            normalizer = _shapes_tensor(spatial_shapes, offsets).flip(-1)
            # (B, Q, L, 2) -> (B, Q, 1, L, 1, 2) + (B, Q, h, L, P, 2) / (1, 1, 1, L, 1, 2)
            return (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        if reference_points.shape[-1] == 4:
            # (B, Q, L, 4) -> (B, Q, 1, L, 1, 4): centre plus offsets scaled by the half-size
            boxes = reference_points[:, :, None, :, None, :]
            return boxes[..., :2] + offsets / self.n_points * boxes[..., 2:] * 0.5
        raise ValueError(
            "the last dimension of reference_points must be 2 (points) or 4 (boxes), "
            f"got {reference_points.shape[-1]}"
        )

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from each query to points around its reference in every level.

        Args:
            query: ``(B, Q, C)``, with its positional embedding already added.
            reference_points: ``(B, Q, L, 2)``, normalised ``(x, y)`` points, offsets being
                measured in pixels of each level; or ``(B, Q, L, 4)``, normalised ``cxcywh``
                boxes, offsets being measured in fractions of the box (P steps span half
                its width or height).
            input_flatten: ``(B, S, C)``, the tokens of all levels.
            input_spatial_shapes: ``(H_l, W_l)`` per level: an ``(L, 2)`` long tensor or L
                pairs of ints (``SpatialShapes``).
            input_level_start_index: ``(L,)`` long, the index of each level's first token.
                The PyTorch path derives the split from ``input_spatial_shapes``; the
                argument keeps the official signature, which fused kernels take.
            input_padding_mask: ``(B, S)`` bool, True at padding tokens, or None.

        Returns:
            ``(B, Q, C)``.

        Raises:
            ValueError: if the last dimension of ``reference_points`` is not 2 or 4.
        """
        b, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # padding tokens contribute zeros, as if they lay outside the map
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        # (B, S, C) -> (B, S, h, d)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)
        locations, weights = self.sampling_locations_and_weights(
            query, reference_points, input_spatial_shapes
        )
        # the implementation passed by position: benchmarks/attention_share.py wraps this
        # function with one that forwards positional arguments only
        output = multi_scale_deformable_attention(
            value, input_spatial_shapes, locations, weights, self.implementation
        )
        return self.output_proj(output)
