"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

DAB-DETR's attentions project their inputs outside the attention (content and position
separately), and its cross-attention has queries and keys twice as wide as its values
(each head concatenates a content and a positional part). ``Attention`` takes projected
tensors of any such widths (narrower values are zero-padded so that the fused kernel, which
never materialises the attention weights, applies); ``PackedAttention`` adds DETR's packed
projections (``nn.MultiheadAttention``'s names), and ``EncoderSelfAttention`` its
self-attention, positions added to queries and keys.

Shapes: B batch, Nq queries, Nk keys, h heads, E query/key width, V value width.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention", "EncoderSelfAttention", "PackedAttention", "key_padding_to_attn_mask",
    "multi_head_attention",
]


def key_padding_to_attn_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(B, Nk)`` bool, True at padding -> ``(B, 1, 1, Nk)`` bool, True where attention is
    allowed (SDPA's convention), or None for no mask."""
    if key_padding_mask is None:
        return None
    return ~key_padding_mask[:, None, None, :]


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention over ``num_heads`` heads, scale ``(E / h) ** -0.5``.

    Args:
        query: ``(B, Nq, E)``.
        key: ``(B, Nk, E)``.
        value: ``(B, Nk, V)``.
        num_heads: h; E and V must be divisible by it.
        attn_mask: bool, broadcastable to ``(B, h, Nq, Nk)`` (a key padding mask
            ``(B, 1, 1, Nk)``, or a per-query mask ``(B, 1, Nq, Nk)`` such as denoising's), True
            where a key may be attended, or None.
        dropout_p: dropout on the attention weights.

    Returns:
        ``(B, Nq, V)``: the heads' outputs concatenated.
    """
    b, nq, e = query.shape
    nk, v = key.shape[1], value.shape[2]
    dk, dv = e // num_heads, v // num_heads
    # (B, N, h * d) -> (B, h, N, d): SDPA's layout
    q = query.view(b, nq, num_heads, dk).transpose(1, 2)
    k = key.view(b, nk, num_heads, dk).transpose(1, 2)
    val = value.view(b, nk, num_heads, dv).transpose(1, 2)
    if dv < dk:
        # SDPA's fused kernel on CPU (flash, as CUDA's) needs values as wide as the keys;
        # otherwise SDPA falls back to its math path, which materialises the (B, h, Nq, Nk)
        # weights. Zero channels add zero outputs, dropped below; the scale depends on dk.
        val = F.pad(val, (0, dk - dv))
    out = F.scaled_dot_product_attention(q, k, val, attn_mask=attn_mask, dropout_p=dropout_p)
    # (B, h, Nq, dv) -> (B, Nq, h * dv)
    return out[..., :dv].transpose(1, 2).reshape(b, nq, v)


class Attention(nn.Module):
    """Attention of already projected queries, keys and values, then an output projection."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        """
        Args:
            embed_dim: V, the width of the values and of the output.
            num_heads: number of heads.
            dropout: dropout on the attention weights, in training.
        """
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # the output bias starts at zero, as in every attention of the official models
        # (``nn.MultiheadAttention`` and DAB-DETR's own ``MultiheadAttention``)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Shapes as in ``multi_head_attention``; returns ``(B, Nq, V)``."""
        dropout_p = self.dropout if self.training else 0.0
        out = multi_head_attention(query, key, value, self.num_heads, attn_mask, dropout_p)
        return self.out_proj(out)


class PackedAttention(Attention):
    """``nn.MultiheadAttention``'s computation with its names: queries, keys and values
    projected by the rows of one packed ``in_proj_weight`` (q, k, v rows, in that order), the
    layout of DETR's attentions and of the released checkpoints."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(embed_dim, num_heads, dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        # nn.MultiheadAttention's initialisation
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """``x`` through the packed rows ``part`` (``slice(0, C)``: q, ``slice(C, 2C)``: k,
        ``slice(2C, 3C)``: v; ``slice(0, 2C)``: q and k at once)."""
        return F.linear(x, self.in_proj_weight[part], self.in_proj_bias[part])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: ``(B, Nq, C)`` before the projection (DETR's decoder: content plus query
                position).
            key: ``(B, Nk, C)`` before the projection (memory plus image position).
            value: ``(B, Nk, C)`` before the projection.
            attn_mask: bool, broadcastable to ``(B, h, Nq, Nk)``, True where a key may be
                attended, or None.

        Returns:
            ``(B, Nq, C)``.
        """
        c = query.shape[-1]
        q = self.project(query, slice(0, c))
        k = self.project(key, slice(c, 2 * c))
        v = self.project(value, slice(2 * c, 3 * c))
        return super().forward(q, k, v, attn_mask)


class EncoderSelfAttention(PackedAttention):
    """DETR's self-attention (its encoder's, and its decoder's over the queries): queries and
    keys from ``x + pos``, values from ``x``, through packed projections."""

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, C)`` tokens.
            pos: ``(B, N, C)`` position encoding added to queries and keys.
            attn_mask: bool, broadcastable to ``(B, h, N, N)``, True where a key may be
                attended, or None.

        Returns:
            ``(B, N, C)``.
        """
        c = x.shape[-1]
        # one matmul for q and k, which share their input
        q, k = self.project(x + pos, slice(0, 2 * c)).split(c, dim=-1)
        v = self.project(x, slice(2 * c, 3 * c))
        return Attention.forward(self, q, k, v, attn_mask)
