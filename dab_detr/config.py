"""Config keys of DAB-DETR, added to a Detectron2 ``CfgNode`` by ``add_dab_detr_config``.

Defaults are the paper's R50 model (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better
Queries for DETR", ICLR 2022, arXiv 2201.12329) as released in IDEA-Research/DAB-DETR.
"""

import os
import re
from typing import List, Optional

from detectron2.config import CfgNode as CN

from .utils.user_errors import InputFileNotFoundError, InputValueError, UnknownKeyError, closest

__all__ = ["add_dab_detr_config", "get_dab_detr_cfg"]


def add_dab_detr_config(cfg: CN) -> None:
    """Add ``MODEL.DAB_DETR.*`` and the solver/input keys DAB-DETR uses to ``cfg`` in place."""
    _C = cfg
    _C.MODEL.DAB_DETR = CN()
    d = _C.MODEL.DAB_DETR
    # Number of foreground classes (the classifier has no background class: sigmoid scores).
    d.NUM_CLASSES = 80
    # Number of anchor boxes (queries per pattern).
    d.NUM_QUERIES = 300
    # Learned content patterns; each is paired with every anchor (NUM_QUERIES * NUM_PATTERNS
    # decoder queries). 0: the content queries start at zero (the paper's default model).
    d.NUM_PATTERNS = 0
    # Transformer width, attention heads, FFN width and depth.
    d.HIDDEN_DIM = 256
    d.NHEADS = 8
    d.DIM_FEEDFORWARD = 2048
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    # Dropout in attention outputs and FFNs (0.0 in the released models).
    d.DROPOUT = 0.0
    # FFN activation: "prelu" (one learned slope per layer, as released), "relu" or "gelu".
    d.ACTIVATION = "prelu"
    # Temperatures of the image sine position encoding along y (height) and x (width).
    # The paper tunes them to 20; the released DC5 checkpoints were trained with 10.
    d.PE_TEMPERATURE_H = 20
    d.PE_TEMPERATURE_W = 20
    # 4: anchors are boxes (x, y, w, h). 2: anchor points (x, y), the Conditional-DETR-style
    # ablation of the paper (requires MODULATE_HW_ATTN = False).
    d.QUERY_DIM = 4
    # Scale the x/y parts of the positional query by w_ref/w and h_ref/h (paper Sec. 4.3).
    d.MODULATE_HW_ATTN = True
    # Refine the anchors layer by layer; False keeps the initial anchors in every layer.
    d.ITER_UPDATE = True
    # Add the projected positional query to the content query in every cross-attention,
    # not only in the first decoder layer.
    d.KEEP_QUERY_POS = False
    # One box head per decoder layer instead of one shared head.
    d.BBOX_EMBED_DIFF_EACH_LAYER = False
    # "fixxy": anchor centres drawn uniformly in [0, 1] at construction and never trained.
    d.RANDOM_REFPOINTS_XY = False
    # Detections kept per image at inference: top-k over queries x classes.
    d.NUM_SELECT = 300
    # Compute the set loss on every decoder layer's predictions.
    d.AUX_LOSS = True
    # Loss weights: sigmoid focal classification, L1 and GIoU box losses.
    d.CLASS_WEIGHT = 1.0
    d.BBOX_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    # DETR only (MODEL.META_ARCHITECTURE "DETR", softmax over NUM_CLASSES + 1 classes): the
    # weight of the "no object" class in the class loss (DETR's eos_coef).
    d.NO_OBJECT_WEIGHT = 0.1
    # Focal loss parameters (used by the loss and by the matcher's class cost).
    d.FOCAL_ALPHA = 0.25
    d.FOCAL_GAMMA = 2.0
    # Hungarian matcher costs.
    d.SET_COST_CLASS = 2.0
    d.SET_COST_BBOX = 5.0
    d.SET_COST_GIOU = 2.0

    # The baselines read the keys above too. DETR (META_ARCHITECTURE "DETR") and Conditional
    # DETR ("ConditionalDETR") use NUM_QUERIES as their learned queries; of DAB-DETR's own
    # switches, QUERY_DIM, MODULATE_HW_ATTN and ITER_UPDATE have no effect on them (Conditional
    # DETR: 2-D reference points, fixed, unmodulated; DETR: none), KEEP_QUERY_POS applies to
    # Conditional DETR only, and NUM_PATTERNS, RANDOM_REFPOINTS_XY, BBOX_EMBED_DIFF_EACH_LAYER
    # and DN.ENABLED are refused.

    # Denoising training (DN-DETR, Li et al., CVPR 2022) for both meta-architectures: noised
    # copies of the ground truth as extra decoder queries that reconstruct their object.
    d.DN = CN()
    # The DN-DETR model: a label embedding gives the content queries (DAB-DETR: of the
    # matching queries too, the "no object" row; DAB-Deformable-DETR: a learned C - 1 wide
    # content plus the indicator bit), and training adds the denoising queries and losses.
    d.DN.ENABLED = False
    # Groups of noised copies of every ground-truth object.
    d.DN.NUM_GROUPS = 5
    # Probability that a denoising query's label is replaced by a random class (DINO: twice it,
    # see MODEL.DAB_DETR.DINO).
    d.DN.LABEL_NOISE = 0.2
    # Box jitter: centres move by up to BOX_NOISE * (w/2, h/2), sizes by up to BOX_NOISE * (w, h)
    # (DINO: each corner, see MODEL.DAB_DETR.DINO).
    d.DN.BOX_NOISE = 0.4

    # DAB-Deformable-DETR (MODEL.META_ARCHITECTURE "DABDeformableDETR"): multi-scale deformable
    # attention over the maps of MODEL.RESNETS.OUT_FEATURES (res3, res4, res5: strides 8-32),
    # plus stride-2 3x3 convolutions on the last for the remaining levels. Of the keys above,
    # all apply to it but those of DAB-DETR's attention and heads (MODULATE_HW_ATTN and
    # BBOX_EMBED_DIFF_EACH_LAYER have no effect: it has no such attention and always one box
    # head per layer; KEEP_QUERY_POS, QUERY_DIM 2, ITER_UPDATE False and AUX_LOSS False are
    # refused); PE_TEMPERATURE_H/W are 10000 in its configs, as in Deformable DETR.
    d.DEFORMABLE = CN()
    # Feature levels L (the backbone's maps and the extra ones).
    d.DEFORMABLE.NUM_FEATURE_LEVELS = 4
    # Sampling points per attention head and level, in the encoder and in the decoder.
    d.DEFORMABLE.ENC_N_POINTS = 4
    d.DEFORMABLE.DEC_N_POINTS = 4
    # Two-stage: the top NUM_QUERIES encoder proposals become the anchors (and give the content
    # queries, see TWO_STAGE_QUERY) instead of learned anchors.
    d.DEFORMABLE.TWO_STAGE = False
    # Two-stage, how the proposals are ranked and their content queries made: "official"
    # (DAB-DETR's code, as Deformable DETR: by the first class; the proposal's sine embedding,
    # projected by pos_trans) or "encoder_content" (detrex's two-stage model, as DINO: by the
    # best class; the selected tokens' enc_output_norm(enc_output(memory)), detached); "dino"
    # is DINO's (MODEL.META_ARCHITECTURE "DINO" only).
    d.DEFORMABLE.TWO_STAGE_QUERY = "official"
    # Which implementation computes the multi-scale deformable attention of DAB-Deformable-DETR
    # and DINO (the same function, the same results): "pytorch" (grid_sample, the reference:
    # keeps every sample for the backward pass), "light" (plain PyTorch that keeps none; the
    # faster CPU path), "triton" (fused kernels, CUDA and the triton package) or "auto" (Triton
    # on CUDA when it imports, else "light"). The ONNX export always uses "pytorch".
    d.DEFORMABLE_ATTENTION = "auto"

    # DINO (MODEL.META_ARCHITECTURE "DINO", Zhang et al., ICLR 2023): DAB-Deformable-DETR's
    # two-stage model with DINO's query selection (DEFORMABLE.TWO_STAGE True, TWO_STAGE_QUERY
    # "dino", both required),
    # contrastive denoising, look-forward-twice boxes, one decoder box and class head shared by
    # the layers, and a final decoder norm. It reads NUM_QUERIES (900: the selected proposals),
    # the transformer keys, DEFORMABLE.NUM_FEATURE_LEVELS / ENC_N_POINTS / DEC_N_POINTS, the loss
    # and cost weights (each for the decoder layers, the selected proposals "_interm" and the
    # denoising queries), DN.ENABLED, DN.LABEL_NOISE (DINO's dn_label_noise_ratio, 0.5: half of
    # it is the probability of a redrawn label) and DN.BOX_NOISE (lambda: 1.0); DN.NUM_GROUPS is
    # replaced by DINO.DN_NUMBER.
    d.DINO = CN()
    # Positive denoising queries per image at most (dn_number): each batch gets
    # max(1, DN_NUMBER // its largest object count) groups of positives and as many negatives.
    # (The official code follows this rule for DN_NUMBER >= 50, as in its configs (100); below
    # 50 it makes 2 * DN_NUMBER groups whatever the objects. Here the rule holds for any value.)
    d.DINO.DN_NUMBER = 100
    # A layer's reported boxes refine the previous layer's boxes before they are detached, so
    # that its loss also trains the previous layer's box head (DINO's "look forward twice");
    # False: "look forward once", as DAB-Deformable-DETR.
    d.DINO.LOOK_FORWARD_TWICE = True
    # The image position encoding's pixel offset: 0.0 encodes pixel k (from 1) as k / n (DINO),
    # -0.5 as its centre (k - 0.5) / n (Deformable DETR; detrex's 12-epoch DINO releases,
    # trained with PE_TEMPERATURE_H/W 10000).
    d.DINO.PE_OFFSET = 0.0
    # One class head and one box head shared by the decoder layers, as the official model
    # (dec_pred_class_embed_share, dec_pred_bbox_embed_share); False: one of each per layer,
    # as detrex's DINO, whose checkpoints hold six different ones.
    d.DINO.SHARED_HEADS = True

    # DAT, the Deformable Attention Transformer (Xia et al., CVPR 2022) as the backbone:
    # MODEL.BACKBONE.NAME "build_dat_backbone". Defaults: DAT-T as released (LeapLabTHU/DAT,
    # tag CVPR2022, configs/dat_tiny.yaml); DAT-S has DEPTHS [2, 2, 18, 2]; DAT-B DIMS
    # [128, 256, 512, 1024], HEADS [4, 8, 16, 32], GROUPS [1, 1, 4, 8], DEPTHS [2, 2, 18, 2].
    # MODEL.BACKBONE.FREEZE_AT freezes as in a ResNet: 1 the patch embedding, 2 also stage 1
    # ("res2"), and so on.
    _C.MODEL.DAT = CN()
    # Widths, blocks, heads and offset groups of the four stages (groups: deformable blocks).
    _C.MODEL.DAT.DIMS = [96, 192, 384, 768]
    _C.MODEL.DAT.DEPTHS = [2, 2, 6, 2]
    _C.MODEL.DAT.HEADS = [3, 6, 12, 24]
    _C.MODEL.DAT.GROUPS = [1, 1, 3, 6]
    # Each stage's blocks, the pattern repeated to its depth: L local window attention,
    # S shifted windows, D deformable attention.
    _C.MODEL.DAT.STAGE_SPEC = ["LS", "LS", "LD", "LD"]
    _C.MODEL.DAT.WINDOW_SIZE = 7
    # The offset networks' depthwise kernel per stage, and the offsets' range in map cells.
    _C.MODEL.DAT.KERNEL_SIZES = [9, 7, 5, 3]
    _C.MODEL.DAT.OFFSET_RANGE_FACTOR = 2.0
    # The square image size the deformable blocks' position tables were learned at (224 for
    # the ImageNet releases); other maps read them resized, as the official load_pretrained.
    _C.MODEL.DAT.PRETRAIN_IMG_SIZE = 224
    # Stochastic depth, rising linearly over the blocks to this rate.
    _C.MODEL.DAT.DROP_PATH_RATE = 0.2
    # The stages output ("res2" to "res5", strides 4-32), each through a LayerNorm of its own;
    # empty: the maps the detector reads, MODEL.RESNETS.OUT_FEATURES.
    _C.MODEL.DAT.OUT_FEATURES = []

    # Learning-rate factor of the backbone relative to SOLVER.BASE_LR.
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate factor of the deformable attentions' sampling offsets (and learned
    # reference points) relative to SOLVER.BASE_LR: 0.1 in Deformable DETR's main.py
    # (lr_linear_proj_mult); 1.0 (DINO's official and detrex's recipes) keeps them in the main
    # group.
    _C.SOLVER.LINEAR_PROJ_MULTIPLIER = 1.0
    # "ADAMW" (the paper's optimizer) or "SGD".
    _C.SOLVER.OPTIMIZER = "ADAMW"
    # Passes over DATASETS.TRAIN to train for, instead of SOLVER.MAX_ITER (0: MAX_ITER and
    # STEPS as given). train_net sets MAX_ITER to EPOCHS x ceil(training images /
    # IMS_PER_BATCH), the images counted after FILTER_EMPTY_ANNOTATIONS, and logs it.
    _C.SOLVER.EPOCHS = 0
    # With SOLVER.EPOCHS: STEPS becomes the one iteration at this fraction of MAX_ITER (the
    # paper's schedule drops the learning rate after 40 of 50 epochs); 1.0: no drop.
    _C.SOLVER.LR_DROP_FRACTION = 0.8
    # Periodic checkpoints (every SOLVER.CHECKPOINT_PERIOD) to keep: the newest ones stay,
    # older ones of the same OUTPUT_DIR are deleted; model_final.pth always stays. 0: keep all.
    _C.SOLVER.CHECKPOINTS_TO_KEEP = 3
    # The autocast dtype of SOLVER.AMP.ENABLED (CUDA): "float16" (Detectron2's AMPTrainer, with
    # its loss scaling; every CUDA GPU) or "bfloat16" (no loss scaling; Ampere and later). The
    # set losses, the matcher and the box updates stay float32 (dab_detr/engine/amp.py).
    _C.SOLVER.AMP.PRECISION = "float16"

    # An exponential moving average of the weights (dab_detr/engine/ema.py; the keys are
    # d2go's): after every iteration w_ema <- DECAY * w_ema + (1 - DECAY) * w over parameters
    # and batch-norm statistics. Evaluations score it and checkpoints save it as "model".
    _C.MODEL_EMA = CN()
    _C.MODEL_EMA.ENABLED = False
    _C.MODEL_EMA.DECAY = 0.999

    # COCO-format datasets to register before training or evaluation, each a triple
    # (name, annotation json, image folder); use the names in DATASETS.TRAIN / TEST. E.g.
    # DATASETS.REGISTER_COCO "(('mine_train', 'ann/train.json', 'images/train'),)"
    _C.DATASETS.REGISTER_COCO = ()

    # After evaluation, draw the detections of this many images of each test set into
    # OUTPUT_DIR/inference/<dataset>_detections.png (0: none), keeping scores above the
    # threshold.
    _C.TEST.VIS_NUM_IMAGES = 0
    _C.TEST.VIS_SCORE_THRESHOLD = 0.5

    # The crop branch of DETR's augmentation first resizes the short edge to one of these
    # (DETR: 400, 500, 600, for COCO-sized images), then takes an INPUT.CROP.SIZE crop. Scale
    # both with the image size: with small images a fixed 400-600 zooms every crop far in.
    _C.INPUT.CROP.PRE_RESIZE_SHORT_EDGES = (400, 500, 600)

    # Training images that cannot be read (missing, truncated, not an image): False stops
    # training with an error naming the file; True skips each with a warning, trains on
    # another image instead, and reports the count at the end of training. Evaluation always
    # stops.
    _C.DATALOADER.SKIP_UNREADABLE_IMAGES = False


def get_dab_detr_cfg(config_file: str = "", opts: Optional[List[str]] = None) -> CN:
    """Detectron2's default config with DAB-DETR's keys, merged with ``config_file`` and
    ``opts`` (``["KEY", "VALUE", ...]``).

    Raises:
        InputFileNotFoundError: ``config_file`` (or a ``_BASE_`` it names) does not exist.
        UnknownKeyError: a key of the file or of ``opts`` does not exist; the message names
            the nearest existing keys.
        InputValueError: the file is not YAML, or a value has the wrong type, or ``opts`` is
            not a list of pairs.
    """
    import yaml
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_dab_detr_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise InputFileNotFoundError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except FileNotFoundError as e:  # a _BASE_ it names
            raise InputFileNotFoundError(
                f"{config_file}: the file it names as _BASE_, {e.filename}, does not exist"
            ) from None
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())
            raise InputValueError(f"{config_file} is not valid YAML: {first}") from None
        except (KeyError, AssertionError, ValueError) as e:
            raise _config_error(cfg, e, f"config file {config_file}") from None
    try:
        cfg.merge_from_list(list(opts or []))
    except (KeyError, AssertionError, ValueError) as e:
        raise _config_error(cfg, e, "the command line") from None
    return cfg


# yacs' words for a key it does not have: "Non-existent key: A.B" (merge_from_list, as an
# AssertionError) and "Non-existent config key: A.B" (merge_from_file, as a KeyError)
_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")


def _config_error(cfg: CN, error: Exception, source: str) -> Exception:
    """yacs' error from merging ``source`` into ``cfg``, as a user error that says what to do."""
    message = str(error.args[0]) if error.args else str(error)
    unknown = _UNKNOWN_KEY.search(message)
    if unknown is None:
        return InputValueError(f"{source}: {message}")
    key = unknown.group(1)
    near = closest(key, _all_keys(cfg))
    hint = (f"; did you mean {' or '.join(near)}?" if near
            else " (DAB-DETR's keys are listed in dab_detr/config.py)")
    return UnknownKeyError(f"{source}: {key} is not a config key{hint}")


def _all_keys(node: CN, prefix: str = "") -> List[str]:
    """Every leaf key of ``node``, dotted (``MODEL.DAB_DETR.NUM_QUERIES``)."""
    keys = []
    for name, value in node.items():
        if isinstance(value, CN):
            keys += _all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys
