"""Released weights that load as they are through ``MODEL.WEIGHTS``: one table from config
path (relative to ``configs/``) to file, its COCO 2017 val box AP and who released it. The
README's table of URLs and :func:`dab_detr.model_zoo.get_checkpoint_url` both read it.

Only files whose layout the tests verify are listed: detrex's (``tests/detrex_reference.py``
holds their names and shapes). The official checkpoints have no direct URL (Google Drive and
Tsinghua Cloud folders), so :data:`OFFICIAL_WEIGHTS` says where to find them by hand.
"""

from typing import Dict, NamedTuple

__all__ = ["DETREX_STORAGE", "OFFICIAL_WEIGHTS", "RELEASED_WEIGHTS", "ReleasedWeights"]

DETREX_STORAGE = "https://github.com/IDEA-Research/detrex-storage/releases/download"


class ReleasedWeights(NamedTuple):
    """One released weights file."""

    url: str  # direct download URL, given to MODEL.WEIGHTS as it is
    ap: float  # COCO 2017 val box AP, as its source publishes it
    source: str  # who released it, and where the AP is published


# detrex publishes these files and their AP in its model zoo (docs/source/tutorials/Model_Zoo.md)
_DETREX = "detrex model zoo"

RELEASED_WEIGHTS: Dict[str, ReleasedWeights] = {
    "COCO-Detection/dab_detr_R_50_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.1.0/dab_detr_r50_50ep.pth", 43.3, _DETREX),
    "COCO-Detection/dab_detr_R_50_DC5_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.3.0/converted_dab_detr_r50_dc5.pth", 44.6, _DETREX),
    "COCO-Detection/dab_deformable_detr_R_50_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.2.0/dab_deformable_detr_r50_50ep_49AP.pth", 49.0, _DETREX),
    "COCO-Detection/dab_deformable_detr_R_50_two_stage_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.2.0/dab_deformable_detr_r50_two_stage_49_7AP.pth", 49.7, _DETREX),
    "COCO-Detection/dn_dab_detr_R_50_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.1.0/dn_detr_r50_50ep.pth", 44.7, _DETREX),
    # DN-DETR's official "v2" weights, renamed by detrex into its layout
    "COCO-Detection/dn_dab_deformable_detr_R_50_50ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.1.0/converted_dn_deformable_detr_r50_50ep.pth", 49.5, _DETREX),
}

# Where the official checkpoints of the other configs are, by config name prefix (first match)
OFFICIAL_WEIGHTS = (
    ("dn_", "DN-DETR's README, 'Model Zoo' (https://github.com/IDEA-Research/DN-DETR#model-zoo)"),
    ("", "DAB-DETR's README, 'Model Zoo' (https://github.com/IDEA-Research/DAB-DETR#model-zoo)"),
)
