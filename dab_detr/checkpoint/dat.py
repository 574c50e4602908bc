"""The official DAT's ImageNet checkpoints (LeapLabTHU/DAT, tag ``CVPR2022``: ``models/dat.py``
names) -> this project's DAT backbone (:class:`dab_detr.modeling.dat.DAT`, under
``backbone.body.``).

The official blocks keep their norms and MLPs in stage-wide lists (``layer_norms.{2j, 2j+1}``,
``mlps.j``) and their 1x1 projections as convolutions; here each block holds its own, and the
projections are linear layers. The buffers the sizes determine (``relative_position_index``,
``attn_mask``) are dropped, and so is the ImageNet classifier (``cls_norm``, ``cls_head``).
"""

import re
from typing import List

from ..utils.user_errors import InputValueError
from .renaming import Rule, StateDict, rename, require

__all__ = ["convert_dat", "dat_classifier"]

_PREFIX = "backbone.body."
_DERIVED = re.compile(r"stages\.\d+\.attns\.\d+\.(relative_position_index|attn_mask)")
_CLASSIFIER = re.compile(r"cls_(norm\.norm|head)\.(weight|bias)")


def _norm(m: "re.Match[str]") -> str:
    block, second = divmod(int(m[2]), 2)
    return f"stages.{m[1]}.{block}.norm{second + 1}."


_RULES: List[Rule] = [
    (r"^patch_proj\.0\.", "stem.proj."),
    (r"^patch_proj\.1\.norm\.", "stem.norm."),
    (r"^down_projs\.(\d)\.0\.", r"downsamples.\1.proj."),
    (r"^down_projs\.(\d)\.1\.norm\.", r"downsamples.\1.norm."),
    (r"^stages\.(\d)\.layer_norms\.(\d+)\.norm\.", _norm),
    (r"^stages\.(\d)\.mlps\.(\d+)\.chunk\.linear1\.", r"stages.\1.\2.mlp.0."),
    (r"^stages\.(\d)\.mlps\.(\d+)\.chunk\.linear2\.", r"stages.\1.\2.mlp.2."),
    # window blocks
    (r"^stages\.(\d)\.attns\.(\d+)\.proj_qkv\.", r"stages.\1.\2.attn.qkv."),
    (r"^stages\.(\d)\.attns\.(\d+)\.relative_position_bias_table$",
     r"stages.\1.\2.attn.position_bias.table"),
    # deformable blocks
    (r"^stages\.(\d)\.attns\.(\d+)\.proj_([qkv])\.", r"stages.\1.\2.attn.proj_\3."),
    (r"^stages\.(\d)\.attns\.(\d+)\.rpe_table$", r"stages.\1.\2.attn.position_bias.table"),
    (r"^stages\.(\d)\.attns\.(\d+)\.conv_offset\.0\.", r"stages.\1.\2.attn.offsets.dwconv."),
    (r"^stages\.(\d)\.attns\.(\d+)\.conv_offset\.1\.norm\.", r"stages.\1.\2.attn.offsets.norm."),
    (r"^stages\.(\d)\.attns\.(\d+)\.conv_offset\.3\.", r"stages.\1.\2.attn.offsets.proj."),
]


def convert_dat(sd: StateDict) -> StateDict:
    """An official DAT state dict (the ``"model"`` entry of its checkpoints) -> the
    ``backbone.body.*`` tensors of this project's DAT backbone.

    Raises:
        InputValueError: not an official DAT, or a tensor no rule names (e.g. a stage whose
            input projection is not the identity, which no released model has).
    """
    require(sd, "patch_proj.0.weight", "an official DAT state dict")
    out = {}
    for key, value in sd.items():
        if _DERIVED.fullmatch(key) or _CLASSIFIER.fullmatch(key):
            continue
        if re.fullmatch(r"stages\.\d+\.attns\.\d+\.proj_out\.(weight|bias)", key):
            # both kinds of block call their output projection "proj_out"
            name = "proj_out" if _is_deformable(sd, key) else "proj"
            new = re.sub(r"^stages\.(\d)\.attns\.(\d+)\.proj_out\.",
                         rf"stages.\1.\2.attn.{name}.", key)
        else:
            new = rename(key, _RULES)
            if new == key:
                raise InputValueError(f"unexpected tensor {key!r} {tuple(value.shape)}: not a "
                                      "name of the official DAT (tag CVPR2022) this converter "
                                      "reads")
        if value.dim() == 4 and value.shape[-2:] == (1, 1):  # 1x1 convolutions -> linear
            value = value.flatten(1)
        out[_PREFIX + new] = value
    return out


def _is_deformable(sd: StateDict, key: str) -> bool:
    """Whether ``key``'s block (``stages.i.attns.j.*``) is a deformable one."""
    block = key.rsplit(".", 2)[0]
    return f"{block}.proj_q.weight" in sd


def dat_classifier(sd: StateDict) -> StateDict:
    """The ImageNet classifier of an official DAT state dict: ``norm.{weight,bias}`` (the
    LayerNorm over the last stage) and ``head.{weight,bias}`` (the linear layer)."""
    return {("norm." if "cls_norm" in key else "head.") + key.rsplit(".", 1)[1]: value
            for key, value in sd.items() if _CLASSIFIER.fullmatch(key)}
