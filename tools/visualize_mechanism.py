#!/usr/bin/env python
"""Pictures of DAB-DETR's mechanism for one image, written as PNGs to ``--output``:

  anchors.png                        the learned anchors (initial boxes of all queries), on a
                                     blank unit square and over the image
  box_refinement.png                 one query's box after each decoder layer
  positional_attention_layer<l>.png  that query's positional attention in layer l, per head,
                                     with and without the w/h modulation (learned projections)
  positional_attention_temperature.png  the same mechanism with identity projections, for
                                     image PE temperatures 20 and 10000

    python tools/visualize_mechanism.py \\
        --config-file configs/quick_schedules/dn_dab_detr_R_18_shapes.yaml --input img.png \\
        --output vis/ --opts MODEL.WEIGHTS output/dn_dab_detr_R_18_shapes/model_final.pth

The query is ``--query`` or, by default, the one with the highest score. A positional map is
the softmax over the image of the positional term of the cross-attention logits alone (see
dab_detr/modeling/transformer/mechanism.py); it is evaluated on a ``--grid`` of positions
(default 64 along the longer side; 0: exactly the feature-map tokens the model attends).

For a DAB-Deformable-DETR config (MODEL.META_ARCHITECTURE "DABDeformableDETR"):

  anchors.png                        the learned anchors (two-stage: the encoder's proposals)
  box_refinement.png                 one query's box after each decoder layer
  sampling_points_layer<l>.png       that query's sampling points in layer l, one panel per
                                     feature level, all heads, coloured and sized by their
                                     attention weight, with the anchor as the level sees it

For a DINO config (MODEL.META_ARCHITECTURE "DINO") the same pictures, and:

  anchors.png                        the selected encoder proposals: the top NUM_QUERIES
                                     encoder proposals by their best class, each query's first
                                     anchor (``interm_outputs``)
  selected_proposals.png             the ``--top`` highest-scoring queries: their selected
                                     proposal (first anchor) with the encoder's class and
                                     score, and their box after the last decoder layer

With a DAT backbone (MODEL.BACKBONE.NAME "build_dat_backbone"), also:

  dat_deformed_points.png            per deformable stage, its last deformable block's
                                     deformed points (keys and values are read there), one
                                     colour per offset group, each linked to its reference
                                     point (grey), as the DAT paper's Fig. 6

In DINO a layer's anchors are the previous layer's raw output's refinement, not the boxes it
reports (made from its normed output): box_refinement.png shows the reported boxes.

A level's locations are drawn where its feature map lies on the image (location x of a map of
width W_l and stride s_l at x * W_l * s_l input pixels; see
dab_detr/modeling/deformable_transformer/mechanism.py). ``--layer`` and ``--grid`` apply to
DAB-DETR only.
"""

import dab_detr  # noqa: F401  (first: prepares Detectron2's import, registers DABDETR)

# isort: split
import argparse
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dab_detr.data import register_builtin_datasets  # noqa: E402
from dab_detr.data.images import read_image  # noqa: E402

# the demo's predictor: same weights loading and test-time preprocessing
from dab_detr.engine.predictor import build_predictor, setup_cfg  # noqa: E402
from dab_detr.layers.dat_attention import reference_grid  # noqa: E402
from dab_detr.modeling.dat import recorded_deformed_points  # noqa: E402
from dab_detr.modeling.deformable_transformer.mechanism import (  # noqa: E402
    SamplingTrace,
    level_strides,
    level_to_pixels,
    trace_sampling,
)
from dab_detr.modeling.transformer.mechanism import (  # noqa: E402
    DecoderTrace,
    model_positional_maps,
    positional_query,
    sine_prior_map,
    trace_decoder,
)

logger = logging.getLogger("dab_detr.visualize_mechanism")
TEMPERATURES = (20.0, 10000.0)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pictures of DAB-DETR's (DAB-Deformable-DETR's, DINO's) anchors and "
                    "attention")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--query", type=int, default=None,
                        help="decoder query to follow (default: the highest-scoring one)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="layer whose w/h modulation the temperature picture uses")
    parser.add_argument("--grid", type=int, default=64,
                        help="key positions along the longer side (0: the feature map)")
    parser.add_argument("--top", type=int, default=10,
                        help="DINO: queries drawn in selected_proposals.png")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS m.pth")
    return parser


def _box(ax, box: Sequence[float], size: Tuple[int, int], **style) -> None:
    """Draw a normalised cxcywh box (a point for cxcy) on an image of ``size`` (w, h)."""
    w_img, h_img = size
    if len(box) == 2:
        ax.plot(box[0] * w_img, box[1] * h_img, "o", color=style.get("edgecolor"), ms=4)
        return
    cx, cy, w, h = box
    ax.add_patch(Rectangle(((cx - w / 2) * w_img, (cy - h / 2) * h_img), w * w_img, h * h_img,
                           fill=False, **style))


def _save(fig, path: str, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _show(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_anchors(anchors: torch.Tensor, query: int, image: np.ndarray, path: str,
                 dpi: int, name: str = "learned anchors") -> None:
    """``anchors``: ``(Q, D)`` normalised; the followed query in red."""
    colors = plt.cm.viridis(np.linspace(0, 1, len(anchors)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 6))
    canvas = np.full((400, 400, 3), 255, dtype=np.uint8)
    for ax, background in zip(axes, (canvas, image)):
        _show(ax, background)
        size = (background.shape[1], background.shape[0])
        for i, anchor in enumerate(anchors.tolist()):
            _box(ax, anchor, size, edgecolor=colors[i], linewidth=1, alpha=0.8)
        _box(ax, anchors[query % len(anchors)].tolist(), size, edgecolor="red", linewidth=2.5)
    axes[0].set_title(f"{len(anchors)} {name} (unit square)", fontsize=10)
    axes[1].set_title(f"over the image (red: query {query})", fontsize=10)
    _save(fig, path, dpi)


def plot_refinement(trace: Union[DecoderTrace, SamplingTrace], query: int, image: np.ndarray,
                    class_names: Optional[List[str]], path: str, dpi: int) -> None:
    """The anchor (dashed) and the box each decoder layer predicts for ``query``."""
    layers = [*trace.outputs["aux_outputs"], trace.outputs]
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(layers)))
    fig, ax = plt.subplots(figsize=(7, 7 * image.shape[0] / image.shape[1] + 0.6))
    _show(ax, image, f"query {query}: its box after each decoder layer")
    size = (image.shape[1], image.shape[0])
    _box(ax, trace.anchors[0, query].tolist(), size, edgecolor="white", linewidth=2,
         linestyle="--", label="anchor")
    centres = [trace.anchors[0, query, :2].tolist()]
    for i, (out, color) in enumerate(zip(layers, colors)):
        score, cls = out["pred_logits"][0, query].sigmoid().max(0)
        name = class_names[int(cls)] if class_names else str(int(cls))
        box = out["pred_boxes"][0, query].tolist()
        _box(ax, box, size, edgecolor=color, linewidth=2, label=f"layer {i}: {name} {score:.2f}")
        centres.append(box[:2])
    # the path of the box centre, anchor first
    xs, ys = zip(*[(cx * size[0], cy * size[1]) for cx, cy in centres])
    ax.plot(xs, ys, "-", color="white", linewidth=1)
    ax.scatter(xs, ys, c=["white", *colors], s=25, zorder=3, edgecolors="black")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    _save(fig, path, dpi)


def _heat(ax, image: np.ndarray, attn: torch.Tensor, grid: Tuple[int, int], title: str,
          box: Sequence[float], limits: Tuple[float, float]) -> None:
    """A ``(gh * gw,)`` map over a dimmed image, with the anchor box; colours span
    ``limits`` (min, max), so that panels sharing them compare."""
    _show(ax, (image * 0.5).astype(np.uint8), title)
    ax.imshow(attn.view(grid).cpu().numpy(), cmap="jet", alpha=0.6, vmin=limits[0],
              vmax=limits[1],
              extent=(0, image.shape[1], image.shape[0], 0),
              interpolation="nearest" if min(grid) < 16 else "bilinear")
    _box(ax, box, (image.shape[1], image.shape[0]), edgecolor="white", linewidth=1.5)


def _modulation_text(modulation: Optional[torch.Tensor]) -> str:
    if modulation is None:
        return "no w/h modulation"
    return "w_ref/w={:.2f}, h_ref/h={:.2f}".format(*modulation.tolist())


def plot_layer_maps(model, trace: DecoderTrace, layer: int, query: int, image: np.ndarray,
                    grid: Tuple[int, int], path: str, dpi: int) -> None:
    """Per head, the positional attention of ``query`` in ``layer``: with the modulation the
    model applies, and without it."""
    pq = positional_query(model.transformer.decoder, trace, layer, query)
    if pq.modulation is None:  # the model does not modulate (MODULATE_HW_ATTN False)
        rows = [("no w/h modulation", pq.spatial)]
    else:
        rows = [("modulated", pq.spatial), ("unmodulated", pq.sine)]
    nheads = model.transformer.decoder.layers[layer].nhead
    aspect = image.shape[0] / image.shape[1]
    fig, axes = plt.subplots(len(rows), nheads, squeeze=False,
                             figsize=(2.2 * nheads, 2.2 * aspect * len(rows) + 1.0))
    maps = torch.stack([model_positional_maps(model, layer, sine, grid) for _, sine in rows])
    # (rows, h, HW) -> per head (h,): a head's rows share colours
    low, high = maps.amin((0, 2)), maps.amax((0, 2))
    for r, (label, _) in enumerate(rows):
        for head in range(nheads):
            _heat(axes[r, head], image, maps[r, head], grid, f"head {head}, {label}",
                  pq.anchor.tolist(), (float(low[head]), float(high[head])))
    rows_text = "" if len(rows) == 1 else "; top row: " + _modulation_text(pq.modulation)
    fig.suptitle(f"layer {layer}, query {query}: positional attention per head (image PE "
                 f"temperature {model.position_embedding.temperature_w:g}){rows_text}")
    _save(fig, path, dpi)


def plot_temperatures(model, trace: DecoderTrace, layer: int, query: int, image: np.ndarray,
                      grid: Tuple[int, int], path: str, dpi: int) -> None:
    """The identity-projection map of ``query``'s anchor in ``layer`` for each temperature,
    without and with the layer's w/h modulation."""
    pq = positional_query(model.transformer.decoder, trace, layer, query)
    columns = [None] if pq.modulation is None else [None, pq.modulation]
    aspect = image.shape[0] / image.shape[1]
    fig, axes = plt.subplots(len(TEMPERATURES), len(columns), squeeze=False,
                             figsize=(max(3.6 * len(columns), 6.0),  # room for the title
                                      3.6 * aspect * len(TEMPERATURES) + 1))
    maps = [[sine_prior_map(pq.anchor, grid, t, m) for m in columns] for t in TEMPERATURES]
    values = torch.stack([attn for row in maps for attn in row])
    limits = (float(values.min()), float(values.max()))  # one scale for all
    for r, temperature in enumerate(TEMPERATURES):
        for c, modulation in enumerate(columns):
            title = f"T={temperature:g}, {_modulation_text(modulation)}"
            _heat(axes[r, c], image, maps[r][c], grid, title, pq.anchor.tolist(), limits)
    fig.suptitle(f"layer {layer}, query {query}: sine(anchor) . PE(image), identity projections",
                 fontsize=10)
    _save(fig, path, dpi)


def _grid(size: int, feature_size: Tuple[int, int], image_hw: Tuple[int, int]):
    if size <= 0:
        return feature_size
    h, w = image_hw
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def plot_sampling_points(trace: SamplingTrace, strides: List[int], layer: int, query: int,
                         image: np.ndarray, path: str, dpi: int) -> None:
    """Per level, where ``query`` samples in ``layer`` (all heads; colour and size: the
    attention weight, one scale for all levels), its anchor scaled to the level, and the
    level's feature grid."""
    shapes = trace.spatial_shapes
    in_h, in_w = trace.image_size
    # input pixels -> pixels of the drawn image, (x, y)
    scale = torch.tensor([image.shape[1] / in_w, image.shape[0] / in_h])
    # (h, L, P, 2): per head, level and point
    points = level_to_pixels(trace.locations[layer, query], shapes, strides) * scale
    # (L, 4) cxcywh -> (L, 2, 2) centre and size, scaled as points -> (L, 4) pixels
    boxes = (level_to_pixels(trace.reference_boxes[layer, query].unflatten(-1, (2, 2)),
                             shapes, strides) * scale).flatten(-2)
    weights = trace.weights[layer, query]  # (h, L, P)
    nheads, n_levels, n_points = weights.shape
    high = float(weights.max())
    aspect = image.shape[0] / image.shape[1]
    fig, axes = plt.subplots(1, n_levels, squeeze=False,
                             figsize=(3.4 * n_levels + 1.0, 3.4 * aspect + 1.0))
    for level, ax in enumerate(axes[0]):
        (h_l, w_l), stride = shapes[level].tolist(), strides[level]
        _show(ax, (image * 0.5).astype(np.uint8),
              f"level {level}: {h_l} x {w_l}, stride {stride}\n"
              f"weight {float(weights[:, level].sum()) / nheads:.2f} of 1")
        # the level's pixel boundaries: what a sampling point interpolates between
        ax.vlines(np.arange(w_l + 1) * stride * float(scale[0]), 0, image.shape[0],
                  colors="white", linewidths=0.3, alpha=0.4)
        ax.hlines(np.arange(h_l + 1) * stride * float(scale[1]), 0, image.shape[1],
                  colors="white", linewidths=0.3, alpha=0.4)
        cx, cy, w, h = boxes[level].tolist()
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, edgecolor="white",
                               linewidth=1.5))
        w_level = weights[:, level].flatten()  # (h * P,)
        dots = ax.scatter(points[:, level, :, 0].flatten(), points[:, level, :, 1].flatten(),
                          c=w_level, s=4 + 36 * w_level / high, cmap="plasma", vmin=0,
                          vmax=high, edgecolors="black", linewidths=0.3, zorder=3)
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
    fig.suptitle(f"layer {layer}, query {query}: {nheads} heads x {n_points} points per level",
                 fontsize=10)
    fig.tight_layout()
    fig.colorbar(dots, ax=list(axes[0]), shrink=0.8, label="attention weight")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _dat_pixels(yx: torch.Tensor, map_size: Tuple[int, int], stride: int,
                scale: np.ndarray) -> np.ndarray:
    """DAT locations ``(..., 2)`` (y, x) on a map of ``map_size`` -> ``(N, 2)`` (x, y) pixels
    of the drawn image (``scale``: drawn pixels per input pixel, (x, y))."""
    h, w = map_size
    yx = yx.float().cpu()
    # align_corners: -1 and 1 are the centres of the first and last cells
    cells = (yx.flip(-1) + 1) / 2 * torch.tensor([w - 1, h - 1], dtype=yx.dtype)
    return ((cells + 0.5) * stride).reshape(-1, 2).cpu().numpy() * scale


def plot_deformed_points(points: Dict[Tuple[int, int], torch.Tensor], input_size: Tuple[int, int],
                         image: np.ndarray, path: str, dpi: int, most: int = 300) -> None:
    """Per deformable stage, the deformed points of its last deformable block (``points``:
    ``recorded_deformed_points``' ``(1, G, H, W, 2)`` (y, x) of one image of ``input_size``
    (h, w) input pixels), every group in its colour, each joined to its reference point; at
    most about ``most`` reference points per stage (every k-th row and column)."""
    last = {stage: (block, p[0]) for (stage, block), p in sorted(points.items())}
    # input pixels -> pixels of the drawn image, (x, y)
    scale = np.array([image.shape[1] / input_size[1], image.shape[0] / input_size[0]])
    aspect = image.shape[0] / image.shape[1]
    fig, axes = plt.subplots(1, len(last), squeeze=False,
                             figsize=(4.5 * len(last) + 0.5, 4.5 * aspect + 0.8))
    colours = plt.get_cmap("tab10")
    for ax, (stage, (block, p)) in zip(axes[0], last.items()):
        groups, h, w, _ = p.shape
        stride = 4 * 2**stage
        step = max(1, int(np.ceil(np.sqrt(h * w / most))))
        ref = _dat_pixels(reference_grid(h, w, p)[::step, ::step], (h, w), stride, scale)
        every = f"; every {step}th row and column" if step > 1 else ""
        _show(ax, (image * 0.5).astype(np.uint8),
              f"stage {stage + 1}, block {block + 1}: {h} x {w} map, stride {stride}\n"
              f"{groups} groups{every}")
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="lightgrey", zorder=2)
        for g in range(groups):
            moved = _dat_pixels(p[g, ::step, ::step], (h, w), stride, scale)
            ax.plot(np.stack([ref[:, 0], moved[:, 0]]), np.stack([ref[:, 1], moved[:, 1]]),
                    color=colours(g % 10), linewidth=0.4, alpha=0.6)
            ax.scatter(moved[:, 0], moved[:, 1], s=6, color=colours(g % 10), zorder=3,
                       label=f"group {g + 1}")
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    _save(fig, path, dpi)


def dat_pictures(args: argparse.Namespace, model, images) -> None:
    """``dat_deformed_points.png`` of a model with a DAT backbone."""
    with recorded_deformed_points(model.backbone.body) as points, torch.no_grad():
        model.backbone_features(images)
    image = read_image(args.input, "RGB")
    path = _output_paths(args.output)("dat_deformed_points.png")
    plot_deformed_points(points, tuple(images.image_sizes[0]), image, path, args.dpi)
    logger.info("DAT's deformed points of stages %s: %s",
                sorted({stage + 1 for stage, _ in points}), path)


def _label(logits: torch.Tensor, class_names: Optional[List[str]]) -> str:
    """``"circle 0.42"``: the best class of ``(K,)`` logits and its score."""
    score, cls = logits.sigmoid().max(0)
    return f"{class_names[int(cls)] if class_names else int(cls)} {float(score):.2f}"


def plot_selected_proposals(outputs: Dict, top: int, image: np.ndarray,
                            class_names: Optional[List[str]], path: str, dpi: int) -> None:
    """DINO's query selection for the ``top`` highest-scoring queries: left, the encoder
    proposal each was given as its first anchor (``interm_outputs``: the encoder's class and
    score); right, the same queries' boxes after the last decoder layer. One colour per
    query."""
    interm = outputs["interm_outputs"]
    scores = outputs["pred_logits"][0].sigmoid().max(-1).values  # (NQ,)
    queries = scores.topk(min(top, len(scores))).indices.tolist()
    colors = plt.cm.tab10(np.arange(len(queries)) % 10)
    size = (image.shape[1], image.shape[0])
    aspect = image.shape[0] / image.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * aspect + 1.2))
    num_selected = interm["pred_boxes"].shape[1]
    _show(axes[0], image, f"their selected proposals (first anchors), encoder's class and "
                          f"score\n(query q: the q-th best of the {num_selected} selected)")
    _show(axes[1], image, "their boxes after the last decoder layer")
    for color, q in zip(colors, queries):
        for ax, out, style in ((axes[0], interm, "--"), (axes[1], outputs, "-")):
            box = out["pred_boxes"][0, q].tolist()
            _box(ax, box, size, edgecolor=color, linewidth=2, linestyle=style,
                 label=f"query {q}: {_label(out['pred_logits'][0, q], class_names)}")
    for ax in axes:  # below the image, which it would hide
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=7)
    fig.suptitle(f"DINO query selection: the {len(queries)} highest-scoring queries",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # the legends included
    plt.close(fig)


def _pick_query(parser: argparse.ArgumentParser, outputs: Dict, query: Optional[int]):
    """``(query, its score)``: ``query``, or the query with the highest score."""
    scores = outputs["pred_logits"][0].sigmoid().max(-1).values  # (NQ,)
    query = int(scores.argmax()) if query is None else query
    if not 0 <= query < len(scores):
        parser.error(f"--query {query}: the model has {len(scores)} queries")
    return query, float(scores[query])


def _output_paths(folder: str) -> Callable[[str], str]:
    """Create ``folder``; the path of a file name in it."""
    os.makedirs(folder, exist_ok=True)
    return lambda name: os.path.join(folder, name)


def dab_detr_pictures(args: argparse.Namespace, parser: argparse.ArgumentParser, model,
                      images, image: np.ndarray, class_names: Optional[List[str]]) -> None:
    trace = trace_decoder(model, images)
    query, score = _pick_query(parser, trace.outputs, args.query)
    num_layers = trace.anchors.shape[0]
    layer = args.layer % num_layers
    grid = _grid(args.grid, trace.feature_size, image.shape[:2])
    out = _output_paths(args.output)

    anchors = model.anchors().sigmoid().detach().cpu()  # (Q, D)
    plot_anchors(anchors, query, image, out("anchors.png"), args.dpi)
    plot_refinement(trace, query, image, class_names, out("box_refinement.png"), args.dpi)
    for i in range(num_layers):
        plot_layer_maps(model, trace, i, query, image, grid,
                        out(f"positional_attention_layer{i}.png"), args.dpi)
    plot_temperatures(model, trace, layer, query, image, grid,
                      out("positional_attention_temperature.png"), args.dpi)
    logger.info("query %d (score %.3f): anchor %s; pictures in %s", query, score,
                [round(v, 3) for v in trace.anchors[0, query].tolist()], args.output)


def deformable_pictures(args: argparse.Namespace, parser: argparse.ArgumentParser, model,
                        images, image: np.ndarray, class_names: Optional[List[str]]) -> None:
    trace = trace_sampling(model, images)
    query, score = _pick_query(parser, trace.outputs, args.query)
    out = _output_paths(args.output)

    dino = "interm_outputs" in trace.outputs
    if dino:  # the top encoder proposals by their best class are the first anchors
        plot_anchors(trace.outputs["interm_outputs"]["pred_boxes"][0].cpu(), query, image,
                     out("anchors.png"), args.dpi, name="selected encoder proposals")
        plot_selected_proposals(trace.outputs, args.top, image, class_names,
                                out("selected_proposals.png"), args.dpi)
    elif model.two_stage:  # no learned anchors: the decoder starts from the encoder's proposals
        plot_anchors(trace.anchors[0].cpu(), query, image, out("anchors.png"), args.dpi,
                     name="encoder proposals")
    else:
        anchors = model.anchors().sigmoid().detach().cpu()  # (Q, 4)
        plot_anchors(anchors, query, image, out("anchors.png"), args.dpi)
    plot_refinement(trace, query, image, class_names, out("box_refinement.png"), args.dpi)
    strides = level_strides(model)
    for i in range(trace.anchors.shape[0]):
        plot_sampling_points(trace, strides, i, query, image,
                             out(f"sampling_points_layer{i}.png"), args.dpi)
    logger.info("query %d (score %.3f): anchor %s; pictures in %s", query, score,
                [round(v, 3) for v in trace.anchors[0, query].tolist()], args.output)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="dab_detr")
    register_builtin_datasets()
    cfg = setup_cfg(args.config_file, args.opts)
    meta = cfg.MODEL.META_ARCHITECTURE
    if (meta not in ("DABDETR", "DABDeformableDETR", "DINO")
            or cfg.MODEL.DAB_DETR.QUERY_DIM != 4):
        parser.error(f"{args.config_file}: MODEL.META_ARCHITECTURE {meta!r}, QUERY_DIM "
                     f"{cfg.MODEL.DAB_DETR.QUERY_DIM}: the pictures are of anchor boxes, "
                     "DABDETR (QUERY_DIM 4), DABDeformableDETR or DINO")
    predictor = build_predictor(cfg)
    model = predictor.model
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")

    original = read_image(args.input, "BGR")
    resized = predictor.aug.get_transform(original).apply_image(original)
    if cfg.INPUT.FORMAT == "RGB":
        resized = resized[:, :, ::-1]
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    images = model.preprocess_image([{"image": tensor}])
    image = np.ascontiguousarray(original[:, :, ::-1])  # RGB, for drawing
    pictures = (deformable_pictures if meta in ("DABDeformableDETR", "DINO")
                else dab_detr_pictures)
    pictures(args, parser, model, images, image, metadata.get("thing_classes", None))
    if cfg.MODEL.BACKBONE.NAME == "build_dat_backbone":
        dat_pictures(args, model, images)


if __name__ == "__main__":
    main()
