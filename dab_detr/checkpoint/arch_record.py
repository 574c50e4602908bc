"""The architecture record: config settings that change what a model computes but no tensor
shape (DC5 or not, the position-encoding temperatures, ...). A checkpoint of another value
would load without error and compute something else, so checkpoints written here and by
``python -m dab_detr.convert --config-file`` carry the record under :data:`ARCH_KEY`, and
:class:`~dab_detr.checkpoint.DabDetrCheckpointer` compares it with the loading config."""

from typing import Any, Dict

from detectron2.config import CfgNode

__all__ = ["ARCH_KEY", "ARCH_KEYS", "architecture_record", "plain"]

# Checkpoint entry holding architecture_record(cfg) of the model the weights belong to.
ARCH_KEY = "dab_detr_arch"
# Config keys that change what the model computes but no tensor shape: a checkpoint of
# another value loads without error and gives wrong results, so they are recorded and compared.
ARCH_KEYS = (
    "MODEL.RESNETS.RES5_DILATION",  # 2: DC5
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.DAB_DETR.PE_TEMPERATURE_H",
    "MODEL.DAB_DETR.PE_TEMPERATURE_W",
    "MODEL.DAB_DETR.NHEADS",
    "MODEL.DAB_DETR.ACTIVATION",
    "MODEL.DAB_DETR.MODULATE_HW_ATTN",
    "MODEL.DAB_DETR.ITER_UPDATE",
    "MODEL.DAB_DETR.KEEP_QUERY_POS",
    "MODEL.DAB_DETR.DINO.PE_OFFSET",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "INPUT.FORMAT",
)


def architecture_record(cfg: CfgNode) -> Dict[str, Any]:
    """``{config key: value}`` of :data:`ARCH_KEYS` in ``cfg`` (tuples as lists)."""
    record = {}
    for key in ARCH_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        record[key] = plain(node)
    return record


def plain(value: Any) -> Any:
    """Tuples as lists, so that a record read back from a file compares equal."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
