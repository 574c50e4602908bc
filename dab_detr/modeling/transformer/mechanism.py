"""What DAB-DETR's decoder does with its anchors, in numbers that can be drawn.

In decoder layer l the cross-attention logit of query q and image token k is, per head i,
a content term plus a positional term ``<P_q^i, K_k^i> / sqrt(2C / h)`` (each head
concatenates a content and a positional part of C / h channels, so its width is 2C / h):

    P_q = ca_qpos_sine_proj(sine(cx, cy) * query_scale(content) * (h_ref / h, w_ref / w))
    K_k = ca_kpos_proj(PE(k))

``sine`` is the (y, x) sine embedding of the anchor's centre, ``query_scale`` is the identity
in layer 0, ``(w_ref, h_ref)`` comes from ``ref_anchor_head(content)`` and scales the x (y)
half of the embedding (MODULATE_HW_ATTN), and PE is the image's sine position encoding.
``trace_decoder`` records what a model fed each layer; ``positional_query`` rebuilds P_q's
input from it, with and without the modulation; ``positional_attention_map`` turns a query
and keys into the attention that the positional term alone would give.

Shapes: NQ queries, L decoder layers, C channels, h heads, D anchor dims (4: cxcywh, 2: cxcy),
gh x gw grid of key positions, HW = gh * gw. Anchors are normalised to [0, 1].
"""

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...layers import PositionEmbeddingSine, box_sine_embedding
from .decoder import modulate_hw

__all__ = [
    "DecoderTrace",
    "call_argument",
    "predict_with_hooks",
    "PositionalQuery",
    "image_position_keys",
    "model_positional_maps",
    "positional_attention_map",
    "positional_query",
    "sine_prior_map",
    "trace_decoder",
]


def positional_attention_map(
    pos_query: torch.Tensor, pos_keys: torch.Tensor, nheads: int, softmax: bool = True
) -> torch.Tensor:
    """Per head, the attention of positional queries over positional keys.

    Args:
        pos_query: ``(..., C)`` projected positional queries.
        pos_keys: ``(HW, C)`` projected positional keys.
        nheads: h; head i uses channels ``[i * C / h, (i + 1) * C / h)``, as the model does.
        softmax: normalise over the HW keys (the attention weights the positional term
            alone would give); False returns the logits.

    Returns:
        ``(..., h, HW)``: logits ``<q_i, k_i> / sqrt(2C / h)``, the scale of DAB-DETR's
        cross-attention, or their softmax over HW.
    """
    c = pos_query.shape[-1]
    q = pos_query.unflatten(-1, (nheads, c // nheads))  # (..., h, C/h)
    k = pos_keys.unflatten(-1, (nheads, c // nheads))  # (HW, h, C/h)
    logits = torch.einsum("...hd,nhd->...hn", q, k) * (2 * c / nheads) ** -0.5
    return logits.softmax(-1) if softmax else logits


def image_position_keys(
    position_embedding: PositionEmbeddingSine,
    grid_hw: Tuple[int, int],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``(gh * gw, C)``: the image position encoding of an unpadded ``gh x gw`` map, tokens in
    row-major order. Positions are normalised by the map's extent, so a finer grid samples
    the same function of the normalised position as the model's feature map."""
    mask = torch.zeros(1, *grid_hw, dtype=torch.bool, device=device)
    # (1, C, gh, gw) -> (gh * gw, C)
    return position_embedding(mask)[0].flatten(1).T


def sine_prior_map(
    anchor: torch.Tensor,
    grid_hw: Tuple[int, int],
    temperature: float,
    modulation: Optional[torch.Tensor] = None,
    num_pos_feats: int = 128,
) -> torch.Tensor:
    """The positional attention of an anchor with identity projections: the (y, x) sine
    embedding of its centre, modulated, against the image encoding, both at ``temperature``,
    as one head over all channels (a sum of ``cos(omega * (x - cx))`` terms: it peaks at the
    centre and narrows along x as ``w_ref / w`` grows).

    Args:
        anchor: ``(D,)`` normalised, centre first.
        grid_hw: ``(gh, gw)`` key positions.
        temperature: of both encodings (the image's PE_TEMPERATURE_H/W).
        modulation: ``(2,)`` ``(w_ref / w, h_ref / h)``, or None.
        num_pos_feats: channels per axis.

    Returns:
        ``(gh * gw,)`` softmax over the key positions.
    """
    query = box_sine_embedding(anchor[:2], num_pos_feats, temperature)  # (2n,): (y, x)
    encoding = PositionEmbeddingSine(num_pos_feats, temperature, temperature)
    keys = image_position_keys(encoding, grid_hw, anchor.device)
    return positional_attention_map(modulate_hw(query, modulation), keys, nheads=1)[0]


@dataclass
class DecoderTrace:
    """What a DAB-DETR model's decoder was fed for one image.

    Attributes:
        outputs: the model's ``forward_predictions`` (``pred_logits``, ``pred_boxes``,
            ``aux_outputs``): ``(1, NQ, K)`` logits and ``(1, NQ, 4)`` cxcywh boxes per layer.
        anchors: ``(L, NQ, D)`` the anchors each layer used (the same in every layer
            without ITER_UPDATE).
        content: ``(L, NQ, C)`` the content queries entering each layer.
        spatial: ``(L, NQ, C)`` the modulated sine queries each cross-attention projected.
        feature_size: ``(h, w)`` of the unpadded feature map.
    """

    outputs: Dict[str, Any]
    anchors: torch.Tensor
    content: torch.Tensor
    spatial: torch.Tensor
    feature_size: Tuple[int, int]


def call_argument(module: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """The argument ``name`` of a call ``module(*args, **kwargs)``, however it was passed."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments[name]


def predict_with_hooks(model: nn.Module, images: Any, hooks: List[Any]) -> Dict[str, Any]:
    """``model.forward_predictions(images)``, then remove ``hooks`` (the handles of the hooks
    that record what it computes), whatever happens."""
    try:
        return model.forward_predictions(images)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def trace_decoder(model: nn.Module, images: Any) -> DecoderTrace:
    """Run ``model.forward_predictions(images)`` on one image and record its decoder's inputs.

    Args:
        model: a ``DABDETR`` in eval mode.
        images: an ``ImageList`` of one image, as ``model.preprocess_image`` makes it.
    """
    if len(images) != 1:
        raise ValueError(f"trace_decoder takes one image, got {len(images)}")
    decoder = model.transformer.decoder
    seen: Dict[str, Any] = {"content": [], "spatial": []}

    def on_transformer(module, args, kwargs):
        seen["mask"] = call_argument(module, "mask", args, kwargs)[0]  # (H, W): padding

    def on_decoder(module, args, kwargs, output):
        seen["references"] = output[1][:, 0]  # (L or 1, NQ, D)

    def on_layer(module, args, kwargs):
        seen["content"].append(call_argument(module, "tgt", args, kwargs)[0])
        seen["spatial"].append(call_argument(module, "query_sine_embed", args, kwargs)[0])

    hooks = [
        model.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
        decoder.register_forward_hook(on_decoder, with_kwargs=True),
    ]
    hooks += [layer.register_forward_pre_hook(on_layer, with_kwargs=True)
              for layer in decoder.layers]
    outputs = predict_with_hooks(model, images, hooks)
    num_layers = len(decoder.layers)
    valid = ~seen["mask"]
    return DecoderTrace(
        outputs=outputs,
        anchors=seen["references"].expand(num_layers, -1, -1),
        content=torch.stack(seen["content"]),
        spatial=torch.stack(seen["spatial"]),
        feature_size=(int(valid.any(1).sum()), int(valid.any(0).sum())),
    )


@dataclass
class PositionalQuery:
    """The positional query of one decoder query in one layer, before its projection.

    Attributes:
        anchor: ``(D,)`` the anchor the layer used, normalised.
        sine: ``(C,)`` the (y, x) sine embedding of its centre, times ``query_scale`` of the
            content after layer 0: the query without the w/h modulation.
        modulation: ``(2,)`` ``(w_ref / w, h_ref / h)``, or None without MODULATE_HW_ATTN.
        spatial: ``(C,)`` what the layer used: ``modulate_hw(sine, modulation)``.
    """

    anchor: torch.Tensor
    sine: torch.Tensor
    modulation: Optional[torch.Tensor]
    spatial: torch.Tensor


@torch.no_grad()
def positional_query(
    decoder: nn.Module, trace: DecoderTrace, layer: int, query: int
) -> PositionalQuery:
    """Rebuild query ``query``'s positional query in layer ``layer`` from a trace.

    Args:
        decoder: the traced model's ``transformer.decoder``.
    """
    anchor = trace.anchors[layer, query]
    content = trace.content[layer, query]
    sine_embed = box_sine_embedding(anchor, decoder.d_model // 2)
    # the decoder's own function, so the pictures show what the model computes
    sine, modulation = decoder.spatial_query_parts(sine_embed, content, anchor, layer)
    return PositionalQuery(anchor, sine, modulation, trace.spatial[layer, query])


@torch.no_grad()
def model_positional_maps(
    model: nn.Module, layer: int, query_sine: torch.Tensor, grid_hw: Tuple[int, int]
) -> torch.Tensor:
    """Per head, the positional attention of a query in a model's decoder layer.

    Args:
        model: a ``DABDETR``.
        layer: decoder layer index.
        query_sine: ``(C,)`` unprojected positional query (``PositionalQuery.spatial``, or
            ``.sine`` to see the map without the w/h modulation).
        grid_hw: key positions: the model's ``feature_size`` gives exactly the tokens it
            attends; a finer grid samples the same function of the normalised position.

    Returns:
        ``(h, gh * gw)`` softmax over the key positions.
    """
    ca = model.transformer.decoder.layers[layer]
    pos = image_position_keys(model.position_embedding, grid_hw, query_sine.device)
    keys = ca.ca_kpos_proj(pos)
    return positional_attention_map(ca.ca_qpos_sine_proj(query_sine), keys, ca.nhead)
