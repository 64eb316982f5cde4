"""The paper's alignment pictures: each image region with the sentence fragments (dependency triples) it
aligns to, i.e. those with a positive fragment score v_i . s_j, strongest first, coloured by score.

Pure drawing over arrays: the caller computes the (image fragments x sentence fragments) dot matrix with the
model; nothing here loads a model, a cache, a detector or a parser.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline.cache import WHOLE_IMAGE_ROW
from pipeline.images import read_picture

log = logging.getLogger(__name__)

CMAP = "viridis"


@dataclass
class RegionAlignment:
    row: int  # the fragment's row in the region cache (WHOLE_IMAGE_ROW is the whole image)
    box: tuple[float, float, float, float]  # xyxy in original image pixels
    triples: list[tuple[str, float]]  # (label, score > 0), strongest first

    @property
    def best(self) -> float:
        return self.triples[0][1] if self.triples else 0.0


def triple_label(rel: str, head: str, dep: str) -> str:
    """The paper's notation for a sentence fragment: ``rel(head, dependent)``."""
    return f"{rel}({head}, {dep})"


def region_alignments(boxes: np.ndarray, mask: np.ndarray, dots: np.ndarray, labels: Sequence[str],
                      per_region: int = 3) -> list[RegionAlignment]:
    """For each real region, its positively scoring triples, strongest first (at most ``per_region``).

    boxes (K, 4), mask (K,) bool; dots (K, T) with a row per cache row, or (mask.sum(), T) with a row per real
    fragment in cache order (what ``DeFrag.image_fragments`` returns); labels (T,).
    Regions are returned weakest first, so a drawing puts the strongest on top.
    """
    boxes, mask, dots = np.asarray(boxes, np.float64), np.asarray(mask, bool), np.asarray(dots, np.float64)
    rows = np.flatnonzero(mask)
    if dots.ndim != 2 or dots.shape[1] != len(labels):
        raise ValueError(f"dots must be (fragments, {len(labels)} triples), got shape {dots.shape}")
    if dots.shape[0] == len(mask):
        dots = dots[rows]
    elif dots.shape[0] != len(rows):
        raise ValueError(f"dots have {dots.shape[0]} rows: expected {len(mask)} (one per cache row) or "
                         f"{len(rows)} (one per real fragment)")
    out = []
    for row, d in zip(rows.tolist(), dots):
        order = [int(t) for t in np.argsort(-d, kind="stable") if d[t] > 0][:per_region]
        if order:
            out.append(RegionAlignment(row, tuple(float(x) for x in boxes[row]), [(labels[t], float(d[t]))
                                                                                   for t in order]))
    return sorted(out, key=lambda r: r.best)


def draw_alignment(image: str | Path | Image.Image, boxes: np.ndarray, mask: np.ndarray, dots: np.ndarray,
                   labels: Sequence[str], out_path: str | Path, *, title: str = "", per_region: int = 3,
                   max_regions: int = 8, width_px: int = 900) -> Path:
    """Draw the image's regions with the triples each aligns to and save a PNG at ``out_path``.

    The strongest ``max_regions`` aligned regions are drawn; each box and its label take the colour of the
    region's strongest score on one scale for the picture (a colour bar shows it). The whole-image fragment
    has no box: its triples are listed under the picture.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(f"{out_path} is a folder: give the picture a file name, e.g. {out_path / 'top.png'}")
    img = image if isinstance(image, Image.Image) else read_picture(image, Path(image).parent)
    img = img.convert("RGB")
    aligned = region_alignments(boxes, mask, dots, labels, per_region)  # weakest region first
    whole = [a for a in aligned if a.row == WHOLE_IMAGE_ROW]
    regions = [a for a in aligned if a.row != WHOLE_IMAGE_ROW][-max_regions:]
    top = max([a.best for a in aligned], default=1.0)
    norm, cmap = Normalize(vmin=0.0, vmax=top), colormaps[CMAP]

    w, h = img.size
    dpi, fig_w = 100, width_px / 100
    pic_h, top_h, bottom_h = fig_w * 0.9 * h / w, 0.45, 0.8  # inches: picture, title band, text band
    fig_h = pic_h + top_h + bottom_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, bottom_h / fig_h, 0.9, pic_h / fig_h))
    ax.imshow(np.asarray(img), interpolation="lanczos")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    renderer = fig.canvas.get_renderer()
    px_to_data = h / ax.get_window_extent(renderer).height  # image pixels per figure pixel (vertical)
    right = ax.get_window_extent(renderer).x1  # labels end left of this: inside the picture, off the colour bar
    placed = []  # label extents so far, strongest first: a weaker label moves, never a stronger one
    for z, a in enumerate(reversed(regions)):
        x0, y0, x1, y1 = a.box
        colour = cmap(norm(a.best))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2.5,
                               zorder=100 - z))
        text = "\n".join(f"{lab}  {s:.2f}" for lab, s in a.triples)
        t = ax.text(x0 + 2, y0 + 2, text, va="top", ha="left", fontsize=8, color=_ink(colour), zorder=200 - z,
                    bbox={"facecolor": colour, "alpha": 0.85, "edgecolor": "none", "pad": 2})
        overflow = t.get_window_extent(renderer).x1 - right
        if overflow > 0:  # a label near the right edge shifts left to fit the picture
            t.set_x(max(0.0, x0 - overflow * w / ax.get_window_extent(renderer).width))
        placed.append(_place_label(t, renderer, placed, y0 + 2, px_to_data, h))
        if t.get_position()[1] != y0 + 2:  # the label moved: a leader line keeps it tied to its box
            ax.plot([x0 + 1, x0 + 1], [y0, t.get_position()[1]], color=colour, linewidth=1, zorder=150 - z)
    if title:
        fig.text(0.01, 1 - 0.1 / fig_h, title, fontsize=10, ha="left", va="top", wrap=True)
    whole_text = ("whole image: " + ", ".join(f"{lab} {s:.2f}" for lab, s in whole[0].triples)) if whole else \
        "whole image: no positive alignment"
    if not aligned:
        whole_text = "no region aligns to any triple of this sentence (every fragment score <= 0)"
    fig.text(0.01, (bottom_h - 0.1) / fig_h, whole_text, fontsize=9, ha="left", va="top", wrap=True)
    cax = fig.add_axes((0.925, (bottom_h + 0.1 * pic_h) / fig_h, 0.015, 0.8 * pic_h / fig_h))
    cb = fig.colorbar(_mappable(norm, cmap), cax=cax)
    cb.set_label("fragment score v·s", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save or rename leaves nothing behind
    log.debug("alignment picture %s: %d regions drawn", out_path, len(regions))
    return out_path


def _place_label(t, renderer, placed: list, y: float, px_to_data: float, h: float):
    """Slide a label down or up (in steps of its height) until it overlaps no label placed before it."""
    step = t.get_window_extent(renderer).height * px_to_data
    for k in range(40):
        dy = step * ((k + 1) // 2) * (1 if k % 2 else -1)  # 0, +1, -1, +2, -2 ... heights
        if 0 <= y + dy <= h - step:  # the whole label inside the picture (its top is at y + dy)
            t.set_y(y + dy)
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(p) for p in placed):
                return box
    t.set_y(min(y, max(0.0, h - step)))
    return t.get_window_extent(renderer)


def _ink(colour) -> str:
    """Black text on light colours, white on dark ones (relative luminance)."""
    r, g, b = colour[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _mappable(norm: Normalize, cmap):
    from matplotlib.cm import ScalarMappable

    m = ScalarMappable(norm=norm, cmap=cmap)
    m.set_array([])
    return m
