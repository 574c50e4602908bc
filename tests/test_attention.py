"""The SDPA attention modules against an explicit ``softmax(Q K^T / sqrt(d)) V``, with key
padding masks, in inference and in training (outputs and gradients), for the encoder
self-attention (equal widths) and the decoder cross-attention (queries and keys twice as
wide as the values). Also checks that the cross-attention runs on the fused kernel.

Shapes: B batch, Nq queries, Nk keys, h heads, E query/key width, V value width.
"""

from typing import Dict, Optional

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dab_detr.layers.attention import Attention, EncoderSelfAttention, key_padding_to_attn_mask

B, NQ, NK, HEADS = 2, 5, 9, 4
TOL = dict(rtol=0, atol=1e-5)


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    out_proj: nn.Linear,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """``out_proj`` of the heads of ``softmax(q k^T / sqrt(E / h)) v``, step by step.

    Args:
        query: ``(B, Nq, E)``; key: ``(B, Nk, E)``; value: ``(B, Nk, V)``.
        key_padding_mask: ``(B, Nk)`` bool, True at padded keys, or None.

    Returns:
        ``(B, Nq, V)``.
    """
    b, nq, e = query.shape
    nk, v = key.shape[1], value.shape[2]
    d = e // num_heads
    # (B, N, h * d) -> (B, h, N, d)
    q = query.reshape(b, nq, num_heads, d).permute(0, 2, 1, 3)
    k = key.reshape(b, nk, num_heads, d).permute(0, 2, 1, 3)
    val = value.reshape(b, nk, num_heads, v // num_heads).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / d**0.5  # (B, h, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ val  # (B, h, Nq, V / h)
    # (B, h, Nq, V / h) -> (B, Nq, V)
    return out_proj(out.permute(0, 2, 1, 3).reshape(b, nq, v))


def explicit_encoder_attention(
    module: EncoderSelfAttention, x: torch.Tensor, pos: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """``module``'s computation with its weights: q, k from ``x + pos``, v from ``x``."""
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q = (x + pos) @ w_q.T + b_q
    k = (x + pos) @ w_k.T + b_k
    v = x @ w_v.T + b_v
    return explicit_attention(q, k, v, module.num_heads, module.out_proj, key_padding_mask)


def _padding() -> torch.Tensor:
    """``(B, Nk)``: the second sequence has its last 4 keys padded, the first none."""
    mask = torch.zeros(B, NK, dtype=torch.bool)
    mask[1, -4:] = True
    return mask


def _grads(module: nn.Module, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Gradients of the inputs and parameters, taken from (and cleared on) the tensors."""
    grads = {f"input {k}": t.grad for k, t in inputs.items()}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    for t in list(inputs.values()) + list(module.parameters()):
        t.grad = None
    return grads


@pytest.mark.parametrize("key_width,value_width", [(32, 32), (64, 32)],
                         ids=["self-attention", "cross-attention"])
@pytest.mark.parametrize("masked", [True, False], ids=["padding", "no-padding"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_attention_matches_explicit(key_width, value_width, masked, training):
    module = Attention(value_width, HEADS).train(training)
    inputs = {
        "query": torch.randn(B, NQ, key_width, requires_grad=training),
        "key": torch.randn(B, NK, key_width, requires_grad=training),
        "value": torch.randn(B, NK, value_width, requires_grad=training),
    }
    padding = _padding() if masked else None
    with torch.set_grad_enabled(training):
        out = module(**inputs, attn_mask=key_padding_to_attn_mask(padding))
        ref = explicit_attention(*inputs.values(), HEADS, module.out_proj, padding)
    assert out.shape == (B, NQ, value_width)
    torch.testing.assert_close(out, ref, **TOL)
    if not training:
        return
    upstream = torch.randn(B, NQ, value_width)
    (out * upstream).sum().backward()
    grads = _grads(module, inputs)
    (ref * upstream).sum().backward()
    ref_grads = _grads(module, inputs)
    assert set(grads) == {"input query", "input key", "input value", "out_proj.weight",
                          "out_proj.bias"}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    if masked:
        # padded keys and values get no gradient
        assert torch.all(grads["input key"][1, -4:] == 0)
        assert torch.all(grads["input value"][1, -4:] == 0)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_encoder_self_attention_matches_explicit(training):
    module = EncoderSelfAttention(32, HEADS).train(training)
    with torch.no_grad():  # the out_proj bias starts at zero: make it count
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    inputs = {"x": torch.randn(B, NK, 32, requires_grad=training),
              "pos": torch.randn(B, NK, 32, requires_grad=training)}
    padding = _padding()
    with torch.set_grad_enabled(training):
        out = module(**inputs, attn_mask=key_padding_to_attn_mask(padding))
        ref = explicit_encoder_attention(module, *inputs.values(), padding)
    torch.testing.assert_close(out, ref, **TOL)
    if not training:
        return
    upstream = torch.randn(B, NK, 32)
    (out * upstream).sum().backward()
    grads = _grads(module, inputs)
    (ref * upstream).sum().backward()
    ref_grads = _grads(module, inputs)
    assert set(grads) == {"input x", "input pos", "in_proj_weight", "in_proj_bias",
                          "out_proj.weight", "out_proj.bias"}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


@torch.no_grad()
def test_padding_mask_is_effective():
    """Padded keys change nothing with the mask, and do change the output without it (so
    that the equality with the explicit attention tests the mask)."""
    module = Attention(32, HEADS).eval()
    q, k, v = torch.randn(B, NQ, 64), torch.randn(B, NK, 64), torch.randn(B, NK, 32)
    padding = _padding()
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[padding] = torch.randn(4, 64) * 10
    noisy_v[padding] = torch.randn(4, 32) * 10
    mask = key_padding_to_attn_mask(padding)
    torch.testing.assert_close(module(q, noisy_k, noisy_v, mask), module(q, k, v, mask),
                               **TOL)
    assert (module(q, noisy_k, noisy_v) - module(q, k, v))[1].abs().amax() > 1e-2


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cross_attention_runs_on_the_fused_kernel(training):
    """With values half as wide as the keys, SDPA still takes the flash kernel (which never
    materialises the attention weights), forward and backward; outside this restriction it
    would fall back to its math path."""
    module = Attention(32, HEADS).train(training)
    q = torch.randn(B, NQ, 64, requires_grad=training)
    k = torch.randn(B, NK, 64, requires_grad=training)
    v = torch.randn(B, NK, 32, requires_grad=training)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.set_grad_enabled(training):
        out = module(q, k, v, key_padding_to_attn_mask(_padding()))
        if training:
            out.sum().backward()
    assert out.shape == (B, NQ, 32)
