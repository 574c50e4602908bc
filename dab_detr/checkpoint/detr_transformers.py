"""Conversion of Hugging Face transformers' ``DetrForObjectDetection`` and
``ConditionalDetrForObjectDetection`` state dicts into this project's names (the meta-
architectures ``DETR`` and ``ConditionalDETR``, whose names are the official code's).

transformers names a tensor in one of two ways, both accepted:

- the names of its files (``save_pretrained``, the Hub's ``facebook/detr-resnet-50``,
  ``microsoft/conditional-detr-resnet-50``): the backbone under
  ``model.backbone.conv_encoder.model.``, attention outputs ``out_proj``, FFN ``fc1``/``fc2``,
  Conditional DETR's decoder projections ``sa_qcontent_proj`` ... ``ca_qpos_sine_proj``;
- the names of its modules in memory (transformers 5's ``model.state_dict()``, which its
  loading renames the files' into): ``model.backbone.model.``, ``o_proj``, ``mlp.fc1``,
  ``self_attn.q_content_proj`` ... ``encoder_attn.q_pos_sine_proj``.

What differs from the official layout besides the names:

- the attentions of DETR's encoder and decoder and of Conditional DETR's encoder are
  ``nn.MultiheadAttention`` in the official code (one ``in_proj_weight``, rows in q, k, v
  order) and three linear layers (``q_proj``, ``k_proj``, ``v_proj``) in transformers;
- the backbone is timm's ResNet (torchvision's names) or, with ``use_timm_backbone=False``,
  transformers' own ``ResNetBackbone`` (``embedder``, ``encoder.stages.N.layers.M``), whose
  strides are torchvision's (in the 3x3 convolution) unless its config sets
  ``downsample_in_bottleneck``, which the weights cannot tell;
- the class heads of COCO models have 91 rows (Conditional DETR) or 92 (DETR: 91, then "no
  object"), indexed by COCO category id, as the official releases: they are mapped to 80
  classes as :func:`.conversion.convert_official` maps those.

transformers ties no tensors of these two models: every tensor has one name.

Only the sine position encoding (``position_embedding_type="sine"``, the default) exists in
this project; a learned one's tensors are refused.
"""

import re
from typing import Dict, List, Optional

import torch

from ..utils.user_errors import InputValueError
from .renaming import (
    Rule,
    StateDict,
    convert_resnet,
    map_class_head,
    model_by_marker,
    pack_qkv,
    rename,
)

__all__ = ["convert_transformers_detr", "transformers_detr_model"]

# the prefixes of the backbone in files / in memory
_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")

# transformers' ResNetBackbone names -> torchvision's (which convert_resnet reads)
_HF_RESNET_RULES: List[Rule] = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]

# separate q/k/v projections that this project packs into one in_proj (DETR: every attention,
# Conditional DETR: the encoder's); groups: encoder/decoder, layer, attention, q/k/v, tensor
_QKV = {
    "DETR": re.compile(
        r"model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\."
        r"(weight|bias)"
    ),
    "Conditional DETR": re.compile(
        r"model\.(encoder)\.layers\.(\d+)\.(self_attn)\.([qkv])_proj\.(weight|bias)"
    ),
}
_PACKED_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}

# names outside the backbone and the packed projections -> this project's (either model)
_RULES: List[Rule] = [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.(query_scale|ref_point_head)\.", r"transformer.decoder.\1."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    # in memory -> the files' names
    (r"\.o_proj\.", ".out_proj."),
    (r"\.mlp\.(fc[12])\.", r".\1."),
    (r"\.self_attn\.([qk])_(content|pos)_proj\.", r".sa_\1\2_proj."),
    (r"\.self_attn\.v_proj\.", ".sa_v_proj."),
    (r"\.encoder_attn\.([qk])_(content|pos)_proj\.", r".ca_\1\2_proj."),
    (r"\.encoder_attn\.q_pos_sine_proj\.", ".ca_qpos_sine_proj."),
    (r"\.encoder_attn\.v_proj\.", ".ca_v_proj."),
    # the files' names -> this project's
    (r"\.fc([12])\.", r".linear\1."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
]
# the cross-attention's output projection: DETR's nn.MultiheadAttention, Conditional DETR's own
_CROSS_ATTENTION = {"DETR": "multihead_attn", "Conditional DETR": "cross_attn"}

# a name only each model's state dicts have (files, memory) -> the model
_MODEL_KEYS = {
    "model.decoder.ref_point_head.layers.1.weight": "Conditional DETR",
    "model.decoder.layers.0.encoder_attn.q_proj.weight": "DETR",
}


def transformers_detr_model(sd: StateDict) -> str:
    """Which transformers model ``sd`` is the state dict of: ``"DETR"``
    (``DetrForObjectDetection``) or ``"Conditional DETR"``
    (``ConditionalDetrForObjectDetection``).

    Raises:
        InputValueError: neither (e.g. ``DeformableDetrForObjectDetection``, which has their
            ``model.query_position_embeddings.weight`` too).
    """
    return model_by_marker(sd, _MODEL_KEYS, "a transformers DetrForObjectDetection or "
                           "ConditionalDetrForObjectDetection state dict")


def _backbone(sd: StateDict) -> StateDict:
    """The backbone's tensors (timm's or transformers' ResNet) -> ``backbone.*``."""
    prefix = next((p for p in _BACKBONE_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise InputValueError(f"no backbone tensors (under {' or '.join(_BACKBONE_PREFIXES)})")
    resnet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("embedder.") for k in resnet):  # transformers' ResNetBackbone
        resnet = {rename(k, _HF_RESNET_RULES): v for k, v in resnet.items()
                  if not k.endswith("num_batches_tracked")}
    return convert_resnet(resnet, "")


def convert_transformers_detr(sd: StateDict, num_classes: Optional[int] = 80) -> StateDict:
    """transformers' ``DetrForObjectDetection`` or ``ConditionalDetrForObjectDetection`` state
    dict (either naming, see the module's docstring) -> this project's names for the
    meta-architecture ``DETR`` or ``ConditionalDETR``; the class head is laid out for
    ``num_classes`` (None: kept as it is; DETR's keeps its "no object" row last).

    Raises:
        InputValueError: not such a state dict, or a tensor of neither model (e.g. a learned
            position encoding).
    """
    model = transformers_detr_model(sd)
    out = _backbone(sd)
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    unexpected = []
    cross_attention = _CROSS_ATTENTION[model]
    for k, v in sd.items():
        if k.startswith(_BACKBONE_PREFIXES):
            continue
        m = _QKV[model].fullmatch(k)
        if m:  # separate q/k/v projections -> packed in_proj, rows in q, k, v order
            part, layer, attention, proj, tensor = m.groups()
            name = (f"transformer.{part}.layers.{layer}.{_PACKED_ATTENTION[attention]}."
                    f"in_proj_{tensor}")
            qkv.setdefault(name, {})[proj] = v
            continue
        new = rename(k, _RULES)
        new = new.replace(".encoder_attn.out_proj.", f".{cross_attention}.out_proj.")
        if new == k or ".encoder_attn." in new or new.startswith("model."):
            unexpected.append(k)
            continue
        out[new] = v
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (
            f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise InputValueError(
            f"tensors of no {model} of this project (sine position encoding, ResNet backbone): "
            + shown
        )
    out.update(pack_qkv(qkv))
    map_class_head(out, num_classes, no_object=model == "DETR")
    return out
