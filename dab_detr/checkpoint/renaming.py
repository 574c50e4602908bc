"""What every converter of released weights shares (``conversion.py`` for the official code,
transformers and torchvision; ``detrex.py`` for detrex): renaming by regular expressions, a
torchvision ResNet's names in Detectron2's, and the rows of a class head.

Shapes: K classes, C channels.
"""

import re
from typing import Callable, Collection, Dict, List, Optional, Tuple, Union

import torch

from ..utils.user_errors import InputValueError

__all__ = [
    "ClassCountError", "Rule", "StateDict", "coco_class_rows", "convert_resnet",
    "fit_dino_heads", "map_class_head", "model_by_marker", "pack_qkv", "rename", "require",
]

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


def rename(name: str, rules: List[Rule]) -> str:
    """``name`` with every rule applied in turn (``re.sub``)."""
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def convert_resnet(sd: StateDict, prefix: str) -> StateDict:
    """Backbone tensors under ``prefix`` (torchvision names) -> ``backbone.*`` (Detectron2)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix) or k.endswith("num_batches_tracked"):
            continue
        name = k[len(prefix) :]
        if name.startswith("fc."):
            continue  # ImageNet classifier
        new = rename(name, _RESNET_RULES)
        if new == name:
            raise InputValueError(
                f"unexpected backbone tensor {k!r}: not a torchvision ResNet name"
            )
        out["backbone." + new] = v
    return out


def coco_class_rows() -> List[int]:
    """Rows of a 91-way COCO classifier (indexed by COCO category id) for Detectron2's 80
    contiguous classes, in Detectron2's order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


class ClassCountError(InputValueError):
    """A class head whose rows cannot be mapped to the model's class count."""


def _class_rows(name: str, rows: int, num_classes: int) -> Optional[torch.Tensor]:
    """Index of the rows of a ``rows``-row class head that give ``num_classes`` classes;
    None: all of them, in their order."""
    if rows == num_classes:
        return None
    if rows == 91 and num_classes == 80:
        return torch.as_tensor(coco_class_rows())
    raise ClassCountError(
        f"{name} has {rows} rows; cannot map them to NUM_CLASSES={num_classes} "
        "(supported: equal counts, or the 91-row COCO-id head to 80 classes)"
    )


def _rows_with_no_object(name: str, rows: int, num_classes: int) -> Optional[torch.Tensor]:
    """As :func:`_class_rows`, for a head with one more row, the last "no object" (DETR's class
    head, DN-DETR's label embedding)."""
    if rows == num_classes + 1:
        return None
    if rows == 92 and num_classes == 80:
        return torch.as_tensor(coco_class_rows() + [91])  # the 80 classes, "no object"
    raise ClassCountError(f"{name} has {rows} rows; cannot map them to "
                          f"NUM_CLASSES={num_classes} (it needs NUM_CLASSES + 1)")


def map_class_head(sd: StateDict, num_classes: Optional[int], no_object: bool = False) -> None:
    """Rows of every class head (``class_embed.*``: one, or one per layer, and DINO's encoder
    head; ``(K, C)`` weights, with ``no_object`` (DETR) ``(K + 1, C)``, the last row "no
    object") for ``num_classes``, and of DN-DETR's (and DINO's) label embedding
    (``label_enc.weight``: one row per class, then "no object"). A head of the model's row
    count is kept as it is, and so is every head when ``num_classes`` is None.

    Raises:
        ClassCountError: a head has a count it cannot be mapped from; ``sd`` is unchanged.
    """
    # (DINO's encoder head ``transformer.proposals.enc_out_class_embed`` too)
    names = [k for k in sd if re.fullmatch(
        r"(?:class_embed\.(\d+\.)?|transformer\.proposals\.enc_out_class_embed\.)"
        r"(weight|bias)", k)]
    if not names:
        raise InputValueError(f"no class head (class_embed.*) among {len(sd)} tensors")
    if num_classes is None:
        return
    head_rows = _rows_with_no_object if no_object else _class_rows
    index = {name: head_rows(name, sd[name].shape[0], num_classes) for name in names}
    if "label_enc.weight" in sd:
        index["label_enc.weight"] = _rows_with_no_object(
            "label_enc.weight", sd["label_enc.weight"].shape[0], num_classes)
    for name, rows in index.items():  # all checked first: nothing changed if one raises
        if rows is not None:
            sd[name] = sd[name][rows]


def fit_dino_heads(sd: StateDict, model_names: Collection[str]) -> None:
    """DINO's decoder heads laid out as the model has them, in place: a file with one shared
    class and box head (the official layout) into a model with one per layer (``DINO.SHARED_HEADS
    False``, detrex's) gives every layer a copy. Other models and matching layouts: unchanged.

    Raises:
        InputValueError: the file has one head per layer and the model shares one, naming the
            key to set.
    """
    if "transformer.proposals.tgt_embed.weight" not in model_names:
        return  # not DINO
    per_layer_model = "class_embed.0.weight" in model_names
    if per_layer_model and "class_embed.weight" in sd:
        layers = sorted({int(m[1]) for k in model_names
                         if (m := re.fullmatch(r"class_embed\.(\d+)\.weight", k))})
        prefixes = ("class_embed.", "bbox_embed.", "transformer.decoder.bbox_embed.")
        shared = {k: v for k, v in sd.items() if k.startswith(prefixes)
                  and not re.match(r"(?:transformer\.decoder\.)?(?:class|bbox)_embed\.\d+\.", k)}
        for k, v in shared.items():
            del sd[k]
            prefix = next(p for p in prefixes[::-1] if k.startswith(p))
            for i in layers:
                sd[f"{prefix}{i}.{k[len(prefix):]}"] = v
    elif not per_layer_model and "class_embed.0.weight" in sd:
        raise InputValueError(
            "the weights have one class and box head per decoder layer (detrex's DINO), the "
            "config one shared head: set MODEL.DAB_DETR.DINO.SHARED_HEADS False (as the "
            "dino_*_detrex.yaml configs do)")


def require(sd: StateDict, key: str, what: str) -> None:
    """Raise InputValueError (a ValueError) unless ``sd`` has ``key``, which every ``what`` has."""
    if key not in sd:
        found = ", ".join(list(sd)[:5])
        raise InputValueError(f"not {what}: it has no {key!r} (first keys: {found})")


def pack_qkv(parts: Dict[str, Dict[str, torch.Tensor]]) -> StateDict:
    """Separate q/k/v projections (transformers') -> ``nn.MultiheadAttention``'s packed
    ``in_proj`` (the official layout): ``{packed name: {"q": t, "k": t, "v": t}}`` ->
    ``{packed name: cat(q, k, v)}``, rows in q, k, v order.

    Raises:
        InputValueError: a packed name lacks one of the three, which is named.
    """
    out = {}
    for name, projections in parts.items():
        missing = [p for p in "qkv" if p not in projections]
        if missing:
            raise InputValueError(f"{name}: no {'/'.join(missing)} projection to pack")
        out[name] = torch.cat([projections["q"], projections["k"], projections["v"]])
    return out


def model_by_marker(sd: StateDict, markers: Dict[str, str], what: str) -> str:
    """The model of the first key of ``markers`` (key -> model) that ``sd`` has.

    Raises:
        InputValueError: ``sd`` has none; the message says it is not ``what`` and names the
            markers and ``sd``'s first keys.
    """
    for key, model in markers.items():
        if key in sd:
            return model
    found = ", ".join(list(sd)[:5])
    raise InputValueError(f"not {what}: it has none of "
                          f"{', '.join(repr(k) for k in markers)} (first keys: {found})")
