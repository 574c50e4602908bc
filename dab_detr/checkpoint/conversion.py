"""Conversion of released DAB-DETR weights into this project's names (the command line is
``python -m dab_detr.convert``, :mod:`dab_detr.convert`).

Sources:
  official      ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/DAB-DETR (DAB-DETR,
                DAB-Deformable-DETR), IDEA-Research/DN-DETR (their DN models),
                facebookresearch/detr (DETR), Atten4Vis/ConditionalDETR and
                IDEA-Research/DINO, released or written by the ``main.py`` of any of them.
  transformers  ``DabDetrForObjectDetection``, ``DetrForObjectDetection`` or
                ``ConditionalDetrForObjectDetection`` weights: a directory, ``.safetensors`` or
                ``.bin`` (DETR and Conditional DETR: ``detr_transformers.py``).
  torchvision   an ImageNet ResNet state dict, for ``MODEL.WEIGHTS`` when training on COCO.
  detrex        ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/detrex: DAB-DETR
                (R50, R50-DC5), DN-DETR and one-stage DAB-Deformable-DETR (``detrex.py``).
  dat           the official DAT's ImageNet checkpoints (LeapLabTHU/DAT, ``{"model": ...}``),
                for ``MODEL.WEIGHTS`` with the DAT backbone (``dat.py``).

:func:`detect_layout` tells these layouts, and this project's own names, apart by the names
of a state dict: ``--source auto`` and ``DabDetrCheckpointer`` (``MODEL.WEIGHTS``) use it.
With a config, the result is laid out for (fixxy anchors) and checked against the model that
config builds. Nothing is unpickled beyond tensors, plain containers and the official training
script's ``argparse.Namespace`` (see ``safe_load.py``).
"""

import logging
import re
from typing import Any, Callable, Collection, Dict, List, Optional, Union

import torch

from ..utils.user_errors import InputValueError
from .dat import convert_dat
from .detr_transformers import convert_transformers_detr
from .detrex import convert_detrex
from .renaming import (
    Rule,
    StateDict,
    convert_resnet,
    map_class_head,
    model_by_marker,
    pack_qkv,
    rename,
    require,
)
from .safe_load import load_state_dict_file

__all__ = [
    "CONVERTERS", "check_against_config", "convert", "convert_official", "convert_state_dict",
    "convert_torchvision", "convert_transformers", "detect_layout", "official_model",
    "state_dict_of",
]

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


# a name only the official checkpoints of each model have -> the model
_OFFICIAL_MODELS = {
    "transformer.tgt_embed.weight": "DINO",
    "refpoint_embed.weight": "DAB-DETR",  # DAB-DETR, DAB-Deformable-DETR and DN-DETR's
    "transformer.decoder.layers.0.multihead_attn.in_proj_weight": "DETR",
    "transformer.decoder.ref_point_head.layers.1.weight": "Conditional DETR",
}


def official_model(sd: StateDict) -> str:
    """Which official model's checkpoint ``sd`` is: ``"DAB-DETR"`` (the DAB-DETR and DN-DETR
    repositories' models), ``"DETR"``, ``"Conditional DETR"`` or ``"DINO"``."""
    return model_by_marker(sd, _OFFICIAL_MODELS, "a checkpoint of the official DAB-DETR, "
                           "DN-DETR, DETR, Conditional DETR or DINO code")


# DINO's proposal selection: the official transformer's modules -> this project's
# EncoderProposals (``transformer.proposals``)
_DINO_PROPOSALS = re.compile(
    r"transformer\.(enc_output|enc_output_norm|enc_out_class_embed|enc_out_bbox_embed"
    r"|tgt_embed)\.(.+)"
)
# DINO's decoder heads: one module each, registered under twelve names (one per layer, in the
# decoder and in the detector); the group is the name inside the head
_DINO_SHARED_HEADS = re.compile(
    r"(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.(.+)"
)


def _convert_official_dino(sd: StateDict) -> StateDict:
    """DINO's non-backbone tensors -> this project's names: the proposal modules under
    ``transformer.proposals.``, and each shared decoder head once as ``class_embed.*`` and
    ``bbox_embed.*`` (plus the decoder's ``transformer.decoder.bbox_embed.*``, the same
    module), after checking that its twelve names hold one value.

    Raises:
        InputValueError: the names of one head hold different values (then the checkpoint is
            not the official model's, whose heads are shared), naming two of them.
    """
    out: StateDict = {}
    first: Dict[str, str] = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        m = _DINO_SHARED_HEADS.fullmatch(k)
        if m:
            name = f"{m[1]}.{m[2]}"
            if name not in out:
                out[name], first[name] = v, k
            elif not torch.equal(out[name], v):
                raise InputValueError(
                    f"{first[name]} and {k} differ: DINO's decoder heads are shared by its "
                    "layers, so every name of one head holds the same tensor")
            continue
        m = _DINO_PROPOSALS.fullmatch(k)
        out[f"transformer.proposals.{m[1]}.{m[2]}" if m else k] = v
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        out["transformer.decoder." + k] = out[k]
    return out


def convert_official(sd: StateDict, num_classes: Optional[int] = 80) -> StateDict:
    """Checkpoint released with a paper (DAB-DETR, DAB-Deformable-DETR, their DN-DETR models,
    DETR, Conditional DETR or DINO) -> this project's names: the ResNet's are Detectron2's, the
    others are kept (the models here use the official names; DINO's: see
    :func:`_convert_official_dino`). The class heads are laid out for
    ``num_classes`` (None: kept as they are); DETR's keeps its "no object" row last."""
    sd = sd.get("model", sd)
    model = official_model(sd)
    out = convert_resnet(sd, "backbone.0.body.")
    if model == "DINO":
        out.update(_convert_official_dino(sd))
        map_class_head(out, num_classes)
        return out
    out.update({k: v for k, v in sd.items() if not k.startswith("backbone.")})
    # The decoder's box heads are the detector's (one module under two names). A checkpoint
    # holds both copies; the official model loads bbox_embed.* last, so that copy is the one
    # it computes with.
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        if "transformer.decoder." + k in out:
            out["transformer.decoder." + k] = out[k]
    map_class_head(out, num_classes, no_object=model == "DETR")
    return out


def convert_transformers(sd: StateDict, num_classes: Optional[int] = 80) -> StateDict:
    """``DabDetrForObjectDetection``, ``DetrForObjectDetection`` or
    ``ConditionalDetrForObjectDetection`` state dict -> this project's names (the latter two:
    :func:`.detr_transformers.convert_transformers_detr`, for ``DETR`` and
    ``ConditionalDETR``); the class heads are laid out for ``num_classes`` (None: kept as they
    are)."""
    if "model.query_position_embeddings.weight" in sd:  # DETR, Conditional DETR
        return convert_transformers_detr(sd, num_classes)
    require(sd, "model.query_refpoint_embeddings.weight",
            "a transformers DabDetrForObjectDetection, DetrForObjectDetection or "
            "ConditionalDetrForObjectDetection state dict")
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
    out.update(pack_qkv(qkv))
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
    "dat": convert_dat,
}
# the sources whose files are ImageNet backbones: they give the backbone's tensors only
BACKBONE_SOURCES = ("torchvision", "dat")


# this project's names at the top of a state dict: its meta-architectures' modules and
# buffers (after the ``module.`` prefix of a model saved inside DDP, if any)
_OWN_NAMES = re.compile(
    r"(?:module\.)?(?:(?:backbone\.(?:stem|res[2-5]|body)|transformer|input_proj|class_embed"
    r"|bbox_embed|refpoint_embed|query_embed|tgt_embed|label_enc)\..+|refpoint_xy|pixel_mean"
    r"|pixel_std)"
)
# backbone tensors that an ImageNet file cannot have: DAT's LayerNorms of the detection outputs
_DETECTION_ONLY = re.compile(r"backbone\.body\.out_norms\.")
# layout -> a name (re.fullmatch) that only its files have
_LAYOUT_NAMES = {
    "official": r"backbone\.0\.body\..+",  # DETR's Joiner around a torchvision ResNet
    # DAB-DETR; DETR and Conditional DETR
    "transformers": r"model\.(?:query_refpoint_embeddings|query_position_embeddings)\.weight",
    "detrex": r"anchor_box_embed\.weight|transformer\.level_embeds",  # DAB/DN, deformable
    "torchvision": r"layer1\.0\.conv1\.weight",
    "dat": r"patch_proj\.0\.weight",  # the official DAT (LeapLabTHU/DAT)
}


def detect_layout(sd: StateDict, model_names: Collection[str] = ()) -> str:
    """The layout of ``sd``'s names: ``"dab_detr"`` (this project's own: loaded as it is) or
    a source of :data:`CONVERTERS` (``"official"``, ``"transformers"``, ``"detrex"``,
    ``"torchvision"``).

    Args:
        sd: a state dict (:func:`state_dict_of` a loaded file).
        model_names: the state-dict names of the model ``sd`` is for, if known: a file of
            those names only is in the model's own layout, whatever the model.

    Raises:
        InputValueError: ``sd`` fits none, naming the first of its names that fit no layout.
    """
    if sd and all(k.removeprefix("module.") in model_names for k in sd):
        return "dab_detr"
    for layout, pattern in _LAYOUT_NAMES.items():
        if any(re.fullmatch(pattern, k) for k in sd):
            return layout
    unfit = [k for k in sd if not _OWN_NAMES.fullmatch(k)]
    if sd and not unfit:
        return "dab_detr"
    shown = ", ".join(unfit[:5]) + (f" and {len(unfit) - 5} more" if len(unfit) > 5 else "")
    raise InputValueError(
        "not DAB-DETR weights in a layout this project reads (its own names, official, "
        "transformers, detrex, a torchvision ResNet or an official DAT): "
        + (f"{shown} fit none of them" if sd else "it holds no tensors")
    )


def state_dict_of(loaded: Dict[str, Any]) -> StateDict:
    """The tensors of a weight file as :func:`load_state_dict_file` returns it: its ``"model"``
    (this project's, Detectron2's, the official and detrex files) or ``"state_dict"`` entry,
    else the whole file (transformers, torchvision)."""
    for key in ("model", "state_dict"):
        if isinstance(loaded.get(key), dict):
            return loaded[key]
    return loaded


def convert_state_dict(
    layout: str, sd: StateDict, num_classes: Optional[int] = 80, fixed_anchor_centres: bool = False
) -> StateDict:
    """``sd`` in ``layout`` (a source of :data:`CONVERTERS`) -> this project's names, for a
    model of ``num_classes`` classes (None: the class heads as they are in ``sd``) whose anchor
    centres are fixed (``RANDOM_REFPOINTS_XY``: the ``refpoint_xy`` buffer) or not. A
    torchvision ResNet gives the backbone's tensors only."""
    if layout == "dab_detr":
        raise InputValueError("already in this project's names: MODEL.WEIGHTS loads it as it "
                              "is, there is nothing to convert")
    if layout in BACKBONE_SOURCES:
        return CONVERTERS[layout](sd)
    out = CONVERTERS[layout](sd, num_classes)
    if fixed_anchor_centres:
        _split_fixed_anchor_centres(out)
    return out


def convert(source: str, path: Union[str, Dict[str, Any]], cfg=None) -> StateDict:
    """Load ``path`` (a file or a transformers model directory; or what
    :func:`load_state_dict_file` returned for one) and convert it from ``source``, a source of
    :data:`CONVERTERS`; with a Detectron2 ``cfg``, lay it out for and check it against the
    model that ``cfg`` builds."""
    loaded = load_state_dict_file(path) if isinstance(path, str) else path
    num_classes, fixed_anchor_centres = 80, False
    if cfg is not None:
        num_classes = cfg.MODEL.DAB_DETR.NUM_CLASSES
        fixed_anchor_centres = cfg.MODEL.DAB_DETR.RANDOM_REFPOINTS_XY
    out = convert_state_dict(source, state_dict_of(loaded), num_classes, fixed_anchor_centres)
    if cfg is not None:
        check_against_config(out, cfg, backbone_only=source in BACKBONE_SOURCES)
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
                and (not backbone_only or (k.startswith("backbone.")
                                           and not _DETECTION_ONLY.match(k)))]
    problems += [f"missing: {k} {tuple(expected[k].shape)}" for k in required if k not in sd]
    if problems:
        raise InputValueError(
            "the converted weights do not match the config:\n  " + "\n  ".join(problems)
        )
