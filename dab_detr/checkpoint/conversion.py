"""Conversion of released DAB-DETR weights into this project's names (the command line is
``python -m dab_detr.convert``, :mod:`dab_detr.convert`).

Sources:
  official      ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/DAB-DETR (DAB-DETR,
                DAB-Deformable-DETR) and IDEA-Research/DN-DETR (their DN models), released
                or written by the ``main.py`` of either.
  transformers  ``DabDetrForObjectDetection`` weights: a directory, ``.safetensors`` or ``.bin``.
  torchvision   an ImageNet ResNet state dict, for ``MODEL.WEIGHTS`` when training on COCO.
  detrex        ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/detrex: DAB-DETR
                (R50, R50-DC5), DN-DETR and one-stage DAB-Deformable-DETR (``detrex.py``).

With a config, the result is laid out for (fixxy anchors) and checked against the model that
config builds. Nothing is unpickled beyond tensors, plain containers and the official training
script's ``argparse.Namespace`` (see ``safe_load.py``).
"""

import logging
import re
from typing import Callable, Dict, List

import torch

from ..utils.user_errors import InputValueError
from .detrex import convert_detrex
from .renaming import (
    Rule,
    StateDict,
    convert_resnet,
    map_class_head,
    rename,
    require,
)
from .safe_load import load_state_dict_file

__all__ = ["convert", "convert_official", "convert_transformers", "convert_torchvision"]

logger = logging.getLogger(__name__)

# transformers DabDetrForObjectDetection names -> this project's (the official layout)
_TRANSFORMERS_RULES: List[Rule] = [
    (r"^model\.query_refpoint_embeddings\.", "refpoint_embed."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.patterns\.", "transformer.patterns."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^model\.encoder\.", "transformer.encoder."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.", "transformer.decoder."),
    (r"\.(?:self_attn\.)?self_attn_layer_norm\.", ".norm1."),
    (r"\.cross_attn\.cross_attn_layer_norm\.", ".norm2."),
    (r"(decoder\.layers\.\d+)\.mlp\.final_layer_norm\.", r"\1.norm3."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"\.(?:mlp\.)?fc1\.", ".linear1."),
    (r"\.(?:mlp\.)?fc2\.", ".linear2."),
    (r"\.(?:mlp\.)?activation_fn\.", ".activation."),
    (r"\.self_attn\.self_attn\.output_proj\.", ".self_attn.out_proj."),
    (r"\.cross_attn\.cross_attn\.output_proj\.", ".cross_attn.out_proj."),
    (r"\.self_attn\.self_attn_query_content_proj\.", ".sa_qcontent_proj."),
    (r"\.self_attn\.self_attn_query_pos_proj\.", ".sa_qpos_proj."),
    (r"\.self_attn\.self_attn_key_content_proj\.", ".sa_kcontent_proj."),
    (r"\.self_attn\.self_attn_key_pos_proj\.", ".sa_kpos_proj."),
    (r"\.self_attn\.self_attn_value_proj\.", ".sa_v_proj."),
    (r"\.cross_attn\.cross_attn_query_content_proj\.", ".ca_qcontent_proj."),
    (r"\.cross_attn\.cross_attn_query_pos_proj\.", ".ca_qpos_proj."),
    (r"\.cross_attn\.cross_attn_key_content_proj\.", ".ca_kcontent_proj."),
    (r"\.cross_attn\.cross_attn_key_pos_proj\.", ".ca_kpos_proj."),
    (r"\.cross_attn\.cross_attn_value_proj\.", ".ca_v_proj."),
    (r"\.cross_attn\.cross_attn_query_pos_sine_proj\.", ".ca_qpos_sine_proj."),
]


def convert_official(sd: StateDict, num_classes: int = 80) -> StateDict:
    """Checkpoint released with the paper (DAB-DETR or DAB-Deformable-DETR) -> this project's
    names: the ResNet's are Detectron2's, the others are kept."""
    sd = sd.get("model", sd)
    require(sd, "refpoint_embed.weight", "a DAB-DETR checkpoint of the official repository")
    out = convert_resnet(sd, "backbone.0.body.")
    out.update({k: v for k, v in sd.items() if not k.startswith("backbone.")})
    # The decoder's box heads are the detector's (one module under two names). A checkpoint
    # holds both copies; the official model loads bbox_embed.* last, so that copy is the one
    # it computes with.
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        if "transformer.decoder." + k in out:
            out["transformer.decoder." + k] = out[k]
    map_class_head(out, num_classes)
    return out


def convert_transformers(sd: StateDict, num_classes: int = 80) -> StateDict:
    """``DabDetrForObjectDetection`` state dict -> this project's names."""
    require(sd, "model.query_refpoint_embeddings.weight",
            "a transformers DabDetrForObjectDetection state dict")
    out = convert_resnet(sd, "model.backbone.conv_encoder.model._backbone.")
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("model.backbone.") or k.startswith("model.decoder.bbox_embed."):
            continue  # the decoder's box head is tied to bbox_predictor
        m = re.match(r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:  # separate q/k/v projections -> packed in_proj, rows in q, k, v order
            qkv.setdefault(f"transformer.encoder.layers.{m[1]}.self_attn.in_proj_{m[3]}", {})[
                m[2]
            ] = v
            continue
        out[rename(k, _TRANSFORMERS_RULES)] = v
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        out["transformer.decoder." + k] = out[k]
    map_class_head(out, num_classes)
    return out


def convert_torchvision(sd: StateDict) -> StateDict:
    """ImageNet ResNet (torchvision names) -> Detectron2 backbone weights."""
    sd = sd.get("state_dict", sd)
    require(sd, "layer1.0.conv1.weight", "a torchvision ResNet state dict")
    return convert_resnet(sd, "")


def _split_fixed_anchor_centres(sd: StateDict) -> None:
    """RANDOM_REFPOINTS_XY models keep the anchor centres in a buffer of their own."""
    weight = sd.pop("refpoint_embed.weight")
    sd["refpoint_xy"] = weight[:, :2].clone()
    sd["refpoint_embed.weight"] = weight[:, 2:].clone()


CONVERTERS: Dict[str, Callable[..., StateDict]] = {
    "official": convert_official,
    "transformers": convert_transformers,
    "torchvision": convert_torchvision,
    "detrex": convert_detrex,
}


def convert(source: str, path: str, cfg=None) -> StateDict:
    """Load ``path`` and convert it from ``source``; with a Detectron2 ``cfg``, lay it out
    for and check it against the model that ``cfg`` builds."""
    sd = load_state_dict_file(path)
    if source == "torchvision":
        out = convert_torchvision(sd)
    else:
        num_classes = cfg.MODEL.DAB_DETR.NUM_CLASSES if cfg is not None else 80
        out = CONVERTERS[source](sd, num_classes)
        if cfg is not None and cfg.MODEL.DAB_DETR.RANDOM_REFPOINTS_XY:
            _split_fixed_anchor_centres(out)
    if cfg is not None:
        check_against_config(out, cfg, backbone_only=source == "torchvision")
    return out


def check_against_config(sd: StateDict, cfg, backbone_only: bool = False) -> None:
    """Raise InputValueError (a ValueError) naming every missing, unexpected or mis-shaped
    tensor of ``sd`` for the model built from ``cfg`` (``backbone_only``: ``sd`` holds ImageNet
    weights, so only the ``backbone.*`` tensors must all be there). BatchNorm's
    ``num_batches_tracked`` is never required: no source has it for frozen norms, and loading
    fills it in."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    expected = build_model(cfg).state_dict()
    problems = [f"unexpected: {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
    problems += [
        f"shape: {k} is {tuple(sd[k].shape)}, the config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    required = [k for k in expected if not k.endswith("num_batches_tracked")
                and (not backbone_only or k.startswith("backbone."))]
    problems += [f"missing: {k} {tuple(expected[k].shape)}" for k in required if k not in sd]
    if problems:
        raise InputValueError(
            "the converted weights do not match the config:\n  " + "\n  ".join(problems)
        )
