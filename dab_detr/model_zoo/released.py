"""Released weights that load as they are through ``MODEL.WEIGHTS``: one table from config
path (relative to ``configs/``) to file, its COCO 2017 val box AP and who released it. The
README's table of URLs and :func:`dab_detr.model_zoo.get_checkpoint_url` both read it.

Only files whose layout the tests verify are listed: detrex's (``tests/detrex_reference.py``
and ``tests/data/detrex_dino`` hold their names and shapes) and DETR's official ones
(``tests/data/detr_outputs/detr_r50.json``: the R50's names and shapes; R101 adds ResNet blocks
of the same names). The other official checkpoints have no direct URL (Google Drive, Baidu,
Tsinghua Cloud and OneDrive folders), so
:data:`OFFICIAL_WEIGHTS` says where to find them by hand.
"""

from typing import Dict, NamedTuple

__all__ = [
    "DETREX_STORAGE", "DETR_STORAGE", "OFFICIAL_WEIGHTS", "RELEASED_WEIGHTS", "ReleasedWeights",
    "UNTRAINED",
]

DETREX_STORAGE = "https://github.com/IDEA-Research/detrex-storage/releases/download"
DETR_STORAGE = "https://dl.fbaipublicfiles.com/detr"


class ReleasedWeights(NamedTuple):
    """One released weights file."""

    url: str  # direct download URL, given to MODEL.WEIGHTS as it is
    ap: float  # COCO 2017 val box AP, as its source publishes it
    source: str  # who released it, and where the AP is published


# detrex publishes these files and their AP in its model zoo (docs/source/tutorials/Model_Zoo.md)
_DETREX = "detrex model zoo"
# facebookresearch/detr's README, "Model Zoo": its 500-epoch models
_DETR = "DETR's README"

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
    "COCO-Detection/detr_R_50_500ep.yaml": ReleasedWeights(
        f"{DETR_STORAGE}/detr-r50-e632da11.pth", 42.0, _DETR),
    "COCO-Detection/detr_R_50_DC5_500ep.yaml": ReleasedWeights(
        f"{DETR_STORAGE}/detr-r50-dc5-f0fb7ef5.pth", 43.3, _DETR),
    "COCO-Detection/detr_R_101_500ep.yaml": ReleasedWeights(
        f"{DETR_STORAGE}/detr-r101-2c7b67e5.pth", 43.5, _DETR),
    "COCO-Detection/detr_R_101_DC5_500ep.yaml": ReleasedWeights(
        f"{DETR_STORAGE}/detr-r101-dc5-a2e86def.pth", 44.9, _DETR),
    # DINO as detrex trains it (projects/dino/README.md): one head per decoder layer, and its
    # 12-epoch files with detrex's position encoding (tests/data/detrex_dino: the layout)
    "COCO-Detection/dino_R_50_4scale_12ep_detrex.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.2.0/dino_r50_4scale_12ep_49_2AP.pth", 49.2, _DETREX),
    "COCO-Detection/dino_R_50_4scale_24ep_detrex.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.1.1/dino_r50_4scale_24ep.pth", 50.6, _DETREX),
    "COCO-Detection/dino_R_50_5scale_12ep_detrex.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.2.1/dino_r50_5scale_12ep.pth", 49.6, _DETREX),
    "COCO-Detection/dino_R_101_4scale_12ep.yaml": ReleasedWeights(
        f"{DETREX_STORAGE}/v0.1.1/dino_r101_4scale_12ep.pth", 50.0, _DETREX),
}

# Where the official checkpoints of the other configs are, by config name prefix (first match)
OFFICIAL_WEIGHTS = (
    ("conditional_detr_", "Conditional DETR's README, 'Model Zoo' (OneDrive links; "
                          "https://github.com/Atten4Vis/ConditionalDETR#model-zoo)"),
    ("dn_", "DN-DETR's README, 'Model Zoo' (https://github.com/IDEA-Research/DN-DETR#model-zoo)"),
    ("dino_", "DINO's README, 'Model Zoo' (Google Drive and Baidu links; "
              "https://github.com/IDEA-Research/DINO#model-zoo)"),
    ("", "DAB-DETR's README, 'Model Zoo' (https://github.com/IDEA-Research/DAB-DETR#model-zoo)"),
)
# (a part of the config's file name, why it has no weights): configs that no one has released
# COCO weights of; their MODEL.WEIGHTS is an ImageNet backbone
UNTRAINED = (
    ("_DAT_T_", "no COCO model of a DAB-family detector with a DAT backbone has been released "
              "(DAT's own detection models are mmdetection's Mask R-CNN and RetinaNet); its "
              "MODEL.WEIGHTS is the official DAT ImageNet checkpoint "
              "(https://github.com/LeapLabTHU/DAT)"),
)
