"""Conversion of IDEA-Research/detrex checkpoints into this project's names.

detrex builds DAB-DETR, DN-DETR and DAB-Deformable-DETR from generic transformer layers whose
parts are numbered in the order the layer applies them (``attentions.N``, ``ffns.0``,
``norms.N``); this project names them as the official code does (``self_attn``, ``linear1``,
``norm1`` ...). A detrex file is ``{"model": state_dict, ...}``: a training run adds
``"trainer"`` and ``"iteration"``, which are ignored. What else differs:

- the class heads have Detectron2's 80 contiguous COCO classes, the rows of this project's
  80-class configs (no 91-row COCO-id head as in the official releases);
- some tensors have two names in the state dict (``_TIED``), checked equal and kept once;
- DAB-DETR R50-DC5 uses torchvision's ResNet (under ``backbone.body.``), the other models
  Detectron2's, whose names this project shares.

Supported: DAB-DETR (R50, R50-DC5), DN-DETR, DN-Deformable-DETR, one- and two-stage
DAB-Deformable-DETR, and DINO (``projects/dino``). detrex's DINO has one class and one box head
per decoder layer (this project's ``DINO.SHARED_HEADS False``), and a seventh of each for the
encoder proposals (``transformer.proposals.enc_out_*``); its label embedding has a row per
class, to which the unused "no object" row of the official layout is added as zeros.
detrex's two-stage model is this project's with ``DEFORMABLE.TWO_STAGE_QUERY
"encoder_content"`` (``configs/COCO-Detection/dab_deformable_detr_R_50_two_stage_50ep.yaml``):
its ``transformer.enc_output`` and ``enc_output_norm`` become ``transformer.proposals.*``, and
its last class and box heads (``class_embed.6``, ``bbox_embed.6``) score and refine the
proposals, as this project's.
"""

import logging
import re
from typing import Dict, List, Optional

import torch

from ..utils.user_errors import InputValueError
from .renaming import Rule, StateDict, convert_resnet, map_class_head

__all__ = ["convert_detrex"]

logger = logging.getLogger(__name__)

# (second name, the name it duplicates), for re.fullmatch / re.sub: one tensor saved twice
_TIED: List[Rule] = [
    # detrex hands the detector's box heads to its decoder as modules
    (r"transformer\.decoder\.(bbox_embed\..+)", r"\1"),
    # two-stage: its class heads too (the last one scores the encoder's proposals)
    (r"transformer\.decoder\.(class_embed\..+)", r"\1"),
    # DAB/DN's FFN holds its PReLU as ``activation`` and in ``layers.0`` (Linear, PReLU, ...)
    (r"(transformer\.\w+\.layers\.\d+\.ffns\.0)\.layers\.0\.1\.weight", r"\1.activation.weight"),
]

# detrex name -> this project's, for re.fullmatch / re.sub, outside the transformer's layers
_MODEL_RULES: List[Rule] = [
    (r"backbone\.(stem|res[2-5])\.(.+)", r"backbone.\1.\2"),  # Detectron2's ResNet: same names
    (r"(input_proj|class_embed|bbox_embed)\.(.+)", r"\1.\2"),
    (r"(tgt_embed|refpoint_embed)\.weight", r"\1.weight"),  # deformable: queries, anchors
    (r"anchor_box_embed\.weight", "refpoint_embed.weight"),  # DAB/DN: the anchors
    # DN: a row per class, then the matching queries' label ("no object"), as label_enc
    (r"denoising_generator\.label_encoder\.weight", "label_enc.weight"),
    # deformable input projections (1x1 conv + GroupNorm on res3-res5) are input_proj.0-2
    (r"neck\.convs\.(\d+)\.conv\.(weight|bias)", r"input_proj.\1.0.\2"),
    (r"neck\.convs\.(\d+)\.norm\.(weight|bias)", r"input_proj.\1.1.\2"),
    (r"transformer\.level_embeds", "transformer.level_embed"),
    # two-stage: the projection of the memory that the proposals are scored on
    (r"transformer\.(enc_output|enc_output_norm)\.(weight|bias)", r"transformer.proposals.\1.\2"),
    (r"transformer\.(encoder\.query_scale|decoder\.(?:query_scale|ref_point_head|ref_anchor_head))"
     r"\.(.+)", r"transformer.\1.\2"),
    (r"transformer\.decoder\.post_norm_layer\.(weight|bias)", r"transformer.decoder.norm.\1"),
]

# a layer's FFN: Sequential(Linear, activation, Dropout), Linear, Dropout
_FFN = {"ffns.0.layers.0.0": "linear1", "ffns.0.layers.1": "linear2",
        "ffns.0.activation": "activation"}
_DEFORMABLE_PARTS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def _multihead(detrex: str, ours: str) -> Dict[str, str]:
    """``nn.MultiheadAttention`` wrapped as ``<detrex>.attn``: packed input projection
    (``in_proj_weight``, ``in_proj_bias``) and ``out_proj``."""
    return {f"{detrex}.attn": ours, f"{detrex}.attn.out_proj": f"{ours}.out_proj"}


def _deformable(detrex: str, ours: str) -> Dict[str, str]:
    """Multi-scale deformable attention: the same four projections in both."""
    return {f"{detrex}.{p}": f"{ours}.{p}" for p in _DEFORMABLE_PARTS}


def _conditional(detrex: str, prefix: str, attn: str) -> Dict[str, str]:
    """DAB-DETR's attention with separate content and position projections (``prefix`` sa:
    self-attention, ca: cross-attention; the cross-attention's ``query_pos_proj`` is in the
    first layer only)."""
    parts = {"query_content_proj": "qcontent_proj", "query_pos_proj": "qpos_proj",
             "key_content_proj": "kcontent_proj", "key_pos_proj": "kpos_proj",
             "value_proj": "v_proj"}
    names = {f"{detrex}.{k}": f"{prefix}_{v}" for k, v in parts.items()}
    return {**names, f"{detrex}.out_proj": f"{attn}.out_proj"}


# model family -> {"encoder"/"decoder": {detrex module in a layer: this project's module}}
_LAYER_MODULES: Dict[str, Dict[str, Dict[str, str]]] = {
    "dab": {
        "encoder": {**_multihead("attentions.0", "self_attn"), "norms.0": "norm1",
                    "norms.1": "norm2", **_FFN},
        "decoder": {**_conditional("attentions.0", "sa", "self_attn"),
                    **_conditional("attentions.1", "ca", "cross_attn"),
                    # the anchors' sine embedding, scaled per layer, for the cross-attention
                    "attentions.1.query_pos_sine_proj": "ca_qpos_sine_proj",
                    "norms.0": "norm1", "norms.1": "norm2", "norms.2": "norm3", **_FFN},
    },
    "deformable": {
        "encoder": {**_deformable("attentions.0", "self_attn"), "norms.0": "norm1",
                    "norms.1": "norm2", **_FFN},
        # detrex numbers the norms in order of use; the official code (and this project)
        # calls the one after the self-attention norm2, the one after the cross-attention norm1
        "decoder": {**_multihead("attentions.0", "self_attn"),
                    **_deformable("attentions.1", "cross_attn"),
                    "norms.0": "norm2", "norms.1": "norm1", "norms.2": "norm3", **_FFN},
    },
}


# DINO: detrex name -> this project's, before _MODEL_RULES (the last of the seven heads scores
# and refines the encoder proposals; the static content queries belong to the proposals)
_DINO_RULES: List[Rule] = [
    # the encoder heads, renamed first by _dino_encoder_heads
    (r"transformer\.proposals\.(enc_out_class_embed|enc_out_bbox_embed)\.(.+)",
     r"transformer.proposals.\1.\2"),
    (r"transformer\.tgt_embed\.weight", "transformer.proposals.tgt_embed.weight"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"transformer.decoder.norm.\1"),
    (r"label_enc\.weight", "label_enc.weight"),
]


def _dino_encoder_heads(sd: StateDict) -> StateDict:
    """detrex's DINO: its heads after the N decoder layers' (``class_embed.N``,
    ``bbox_embed.N``) are the encoder's, ``transformer.proposals.enc_out_*`` here."""
    layers = len({m[1] for k in sd if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))})
    head = re.compile(rf"(class|bbox)_embed\.{layers}\.(.+)")
    return {(f"transformer.proposals.enc_out_{m[1]}_embed.{m[2]}" if (m := head.fullmatch(k))
             else k): v for k, v in sd.items()}


def _family(sd: StateDict) -> str:
    """``"dab"`` (DAB-DETR, DN-DETR), ``"deformable"`` (DAB-Deformable-DETR) or ``"dino"``,
    from the keys."""
    if "transformer.level_embeds" in sd:
        return "dino" if "transformer.tgt_embed.weight" in sd else "deformable"
    if "anchor_box_embed.weight" in sd:
        return "dab"
    found = ", ".join(list(sd)[:5])
    raise InputValueError(
        "not a detrex DAB-DETR, DN-DETR, DAB-Deformable-DETR or DINO checkpoint: it has neither "
        f"anchor_box_embed.weight nor transformer.level_embeds ({found}, ...)"
    )


def _log_model(sd: StateDict, family: str) -> None:
    """Say which model the keys show: the family, DN-DETR's label encoder, the backbone."""
    name = {"dab": "DAB-DETR", "deformable": "DAB-Deformable-DETR", "dino": "DINO"}[family]
    if "denoising_generator.label_encoder.weight" in sd:
        name = "DN-DETR"
    if "transformer.enc_output.weight" in sd and family != "dino":
        name = f'two-stage {name} (DEFORMABLE.TWO_STAGE_QUERY "encoder_content")'
    if any(k.startswith("backbone.body.") for k in sd):
        # dilated or not, a torchvision ResNet has the same tensors: the config decides
        logger.info("detrex %s with torchvision's ResNet, which detrex's DC5 configs use: "
                    "convert it with a DC5 config", name)
    else:
        logger.info("detrex %s with Detectron2's ResNet", name)


def _untie(sd: StateDict) -> StateDict:
    """``sd`` with each tensor under one name (``_TIED``): the second name is dropped after
    checking that both hold the same values (or becomes the first, if that is missing)."""
    out = dict(sd)
    for k in sd:
        for pattern, repl in _TIED:
            if re.fullmatch(pattern, k):
                first = re.sub(pattern, repl, k)
                if first in sd and not torch.equal(sd[first], sd[k]):
                    raise InputValueError(f"{k} and {first} are one tensor in detrex's model, "
                                          "but they differ in this checkpoint")
                out.setdefault(first, out[k])
                del out[k]
    return out


def _rename_layer(key: str, family: str) -> Optional[str]:
    """A key of an encoder or decoder layer in this project's names; None if not one."""
    m = re.fullmatch(r"(transformer\.(encoder|decoder)\.layers\.\d+)\.(.+)\.(\w+)", key)
    if m is None:
        return None
    # DINO's layers are the deformable model's
    module = _LAYER_MODULES["deformable" if family == "dino" else family][m[2]].get(m[3])
    return None if module is None else f"{m[1]}.{module}.{m[4]}"


def _rename_model(key: str, extra_convs_from: int, family: str) -> Optional[str]:
    """A key outside the layers in this project's names; None if unknown. ``extra_convs_from``:
    the ``input_proj`` index of the deformable model's first stride-2 convolution on res5."""
    m = re.fullmatch(r"neck\.extra_convs\.(\d+)\.(conv|norm)\.(weight|bias)", key)
    if m:
        index, part = extra_convs_from + int(m[1]), {"conv": 0, "norm": 1}[m[2]]
        return f"input_proj.{index}.{part}.{m[3]}"
    for pattern, repl in (_DINO_RULES if family == "dino" else []) + _MODEL_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_detrex(sd: StateDict, num_classes: Optional[int] = 80) -> StateDict:
    """detrex checkpoint -> this project's names.

    Args:
        sd: ``{"model": state_dict, ...}`` as detrex saves it (the rest is ignored), or the
            state dict itself.
        num_classes: the config's ``NUM_CLASSES``. detrex's class heads have 80 rows (and DN's
            label encoder 81), kept as they are; another count is refused (None: any count
            is kept).

    Returns:
        The state dict in this project's names, the tensors unchanged.

    Raises:
        ValueError: naming every tensor it does not know, or a tied pair that differs.
    """
    sd = _untie(sd.get("model", sd))
    family = _family(sd)
    if family == "dino":
        sd = _dino_encoder_heads(sd)
    _log_model(sd, family)
    out = convert_resnet(sd, "backbone.body.")
    extra_convs_from = len({m[1] for k in sd if (m := re.match(r"neck\.convs\.(\d+)\.", k))})
    unknown = []
    for k, v in sd.items():
        if k.startswith("backbone.body."):
            continue
        new = _rename_layer(k, family) or _rename_model(k, extra_convs_from, family)
        if new is None:
            unknown.append(k)
        elif new in out:
            raise InputValueError(f"two tensors of the detrex checkpoint would become {new}")
        else:
            out[new] = v
    if unknown:
        listed = ", ".join(unknown[:20])
        if len(unknown) > 20:
            listed += f" and {len(unknown) - 20} more"
        raise InputValueError(
            f"unknown tensors in the detrex checkpoint ({family} model): {listed}"
        )
    # this project's decoder holds the detector's box heads under its own name too
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        out["transformer.decoder." + k] = out[k]
    if family == "dino" and "label_enc.weight" in out:
        # K rows -> the official layout's K + 1 (the last, "no object", DINO never reads)
        label_enc = out["label_enc.weight"]
        out["label_enc.weight"] = torch.cat([label_enc, label_enc.new_zeros(1, label_enc.shape[1])])
    map_class_head(out, num_classes)
    return out
