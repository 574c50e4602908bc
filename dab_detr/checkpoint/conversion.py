"""Conversion of released DAB-DETR weights into this project's names (the command line is
``python -m dab_detr.convert``, :mod:`dab_detr.convert`).

Sources:
  official      ``{"model": state_dict, ...}`` checkpoints of IDEA-Research/DAB-DETR (DAB-DETR,
                DAB-Deformable-DETR) and IDEA-Research/DN-DETR (their DN models), released
                or written by the ``main.py`` of either.
  transformers  ``DabDetrForObjectDetection`` weights: a directory, ``.safetensors`` or ``.bin``.
  torchvision   an ImageNet ResNet state dict, for ``MODEL.WEIGHTS`` when training on COCO.

With a config, the result is laid out for (fixxy anchors) and checked against the model that
config builds. Nothing is unpickled beyond tensors, plain containers and the official training
script's ``argparse.Namespace`` (see ``safe_load.py``).
"""

import logging
import re
from typing import Callable, Dict, List, Tuple, Union

import torch

from .safe_load import load_state_dict_file

__all__ = ["convert", "convert_official", "convert_transformers", "convert_torchvision"]

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
# (pattern, replacement) for re.sub: a template string or a function of the match
Rule = Tuple[str, Union[str, Callable[["re.Match[str]"], str]]]

# torchvision ResNet names -> Detectron2 ResNet names
_RESNET_RULES: List[Rule] = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
]

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


def _rename(name: str, rules: List[Rule]) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def _convert_resnet(sd: StateDict, prefix: str) -> StateDict:
    """Backbone tensors under ``prefix`` (torchvision names) -> ``backbone.*`` (Detectron2)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix) or k.endswith("num_batches_tracked"):
            continue
        name = k[len(prefix) :]
        if name.startswith("fc."):
            continue  # ImageNet classifier
        new = _rename(name, _RESNET_RULES)
        if new == name:
            raise ValueError(f"unexpected backbone tensor {k!r}: not a torchvision ResNet name")
        out["backbone." + new] = v
    return out


def coco_class_rows() -> List[int]:
    """Rows of a 91-way COCO classifier (indexed by COCO category id) for Detectron2's 80
    contiguous classes, in Detectron2's order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def _map_class_head(sd: StateDict, num_classes: int) -> None:
    """Rows of every class head (``class_embed.*``: one, or one per layer) for ``num_classes``,
    and of DN-DETR's label embedding (``label_enc.weight``: one row per class, then "no
    object")."""
    names = [k for k in sd if re.fullmatch(r"class_embed\.(\d+\.)?(weight|bias)", k)]
    if not names:
        raise ValueError(f"no class head (class_embed.*) among {len(sd)} tensors")
    if "label_enc.weight" in sd:
        rows = sd["label_enc.weight"].shape[0]
        if rows == 92 and num_classes == 80:
            index = torch.as_tensor(coco_class_rows() + [91])  # the 80 classes, "no object"
            sd["label_enc.weight"] = sd["label_enc.weight"][index]
        elif rows != num_classes + 1:
            raise ValueError(f"label_enc.weight has {rows} rows; cannot map them to "
                             f"NUM_CLASSES={num_classes} (it needs NUM_CLASSES + 1)")
    for name in names:
        rows = sd[name].shape[0]
        if rows == num_classes:
            continue
        if rows == 91 and num_classes == 80:
            sd[name] = sd[name][torch.as_tensor(coco_class_rows())]
            continue
        raise ValueError(
            f"{name} has {rows} rows; cannot map them to NUM_CLASSES={num_classes} "
            "(supported: equal counts, or the 91-row COCO-id head to 80 classes)"
        )


def _require(sd: StateDict, key: str, what: str) -> None:
    """Raise ValueError unless ``sd`` has ``key``, which every ``what`` has."""
    if key not in sd:
        found = ", ".join(list(sd)[:5])
        raise ValueError(f"not {what}: it has no {key!r} (first keys: {found})")


def convert_official(sd: StateDict, num_classes: int = 80) -> StateDict:
    """Checkpoint released with the paper (DAB-DETR or DAB-Deformable-DETR) -> this project's
    names: the ResNet's are Detectron2's, the others are kept."""
    sd = sd.get("model", sd)
    _require(sd, "refpoint_embed.weight", "a DAB-DETR checkpoint of the official repository")
    out = _convert_resnet(sd, "backbone.0.body.")
    out.update({k: v for k, v in sd.items() if not k.startswith("backbone.")})
    # The decoder's box heads are the detector's (one module under two names). A checkpoint
    # holds both copies; the official model loads bbox_embed.* last, so that copy is the one
    # it computes with.
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        if "transformer.decoder." + k in out:
            out["transformer.decoder." + k] = out[k]
    _map_class_head(out, num_classes)
    return out


def convert_transformers(sd: StateDict, num_classes: int = 80) -> StateDict:
    """``DabDetrForObjectDetection`` state dict -> this project's names."""
    _require(sd, "model.query_refpoint_embeddings.weight",
             "a transformers DabDetrForObjectDetection state dict")
    out = _convert_resnet(sd, "model.backbone.conv_encoder.model._backbone.")
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
        out[_rename(k, _TRANSFORMERS_RULES)] = v
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for k in [k for k in out if k.startswith("bbox_embed.")]:
        out["transformer.decoder." + k] = out[k]
    _map_class_head(out, num_classes)
    return out


def convert_torchvision(sd: StateDict) -> StateDict:
    """ImageNet ResNet (torchvision names) -> Detectron2 backbone weights."""
    sd = sd.get("state_dict", sd)
    _require(sd, "layer1.0.conv1.weight", "a torchvision ResNet state dict")
    return _convert_resnet(sd, "")


def _split_fixed_anchor_centres(sd: StateDict) -> None:
    """RANDOM_REFPOINTS_XY models keep the anchor centres in a buffer of their own."""
    weight = sd.pop("refpoint_embed.weight")
    sd["refpoint_xy"] = weight[:, :2].clone()
    sd["refpoint_embed.weight"] = weight[:, 2:].clone()


CONVERTERS: Dict[str, Callable[..., StateDict]] = {
    "official": convert_official,
    "transformers": convert_transformers,
    "torchvision": convert_torchvision,
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
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor of ``sd`` for
    the model built from ``cfg`` (``backbone_only``: ``sd`` holds ImageNet weights, so only
    the ``backbone.*`` tensors must all be there). BatchNorm's ``num_batches_tracked`` is
    never required: no source has it for frozen norms, and loading fills it in."""
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
        raise ValueError(
            "the converted weights do not match the config:\n  " + "\n  ".join(problems)
        )
