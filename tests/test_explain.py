"""Alignment pictures on a demo photo with made-up fragment scores."""
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from model.explain import CMAP, draw_alignment, region_alignments, triple_label

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "images" / "chelsea.png"
LABELS = [triple_label(*t) for t in [("nsubj", "sits", "cat"), ("amod", "cat", "orange"), ("det", "cat", "a")]]


def scene():
    w, h = Image.open(DEMO).size
    boxes = np.zeros((20, 4), np.float32)
    mask = np.zeros(20, bool)
    mask[:4] = True
    boxes[0] = [0, 0, w, h]  # the whole-image row
    boxes[1] = [50, 40, 200, 160]
    boxes[2] = [220, 100, 400, 280]
    boxes[3] = [10, 200, 120, 290]
    dots = np.full((20, 3), -1.0)
    dots[0] = [0.2, -0.1, 0.05]
    dots[1] = [2.0, 0.5, -0.3]  # region 1: nsubj strongest, then amod; det is negative
    dots[2] = [-0.5, 0.7, 0.0]  # region 2: only amod (a zero score is not an alignment)
    dots[3] = [-1.0, -2.0, -0.1]  # region 3 aligns to nothing
    dots[5] = [9.0, 9.0, 9.0]  # padding row: must be ignored
    return boxes, mask, dots, (w, h)


def test_region_alignments_keep_positive_scores_strongest_first():
    boxes, mask, dots, _ = scene()
    al = region_alignments(boxes, mask, dots, LABELS)
    assert [a.row for a in al] == [0, 2, 1]  # weakest region first, region 3 and padding absent
    assert al[-1].triples == [("nsubj(sits, cat)", 2.0), ("amod(cat, orange)", 0.5)]
    assert al[1].triples == [("amod(cat, orange)", 0.7)]
    # the same with one row per real fragment (DeFrag.image_fragments order)
    assert region_alignments(boxes, mask, dots[mask], LABELS) == al
    assert len(region_alignments(boxes, mask, dots, LABELS, per_region=1)[-1].triples) == 1


def test_bad_dot_shapes_are_named():
    boxes, mask, dots, _ = scene()
    with pytest.raises(ValueError, match="expected 20 .* or 4"):
        region_alignments(boxes, mask, dots[:7], LABELS)
    with pytest.raises(ValueError, match="3 triples"):
        region_alignments(boxes, mask, dots[:, :2], LABELS)


def test_draw_alignment_writes_a_png_with_boxes_coloured_by_score(tmp_path):
    boxes, mask, dots, (w, h) = scene()
    out = draw_alignment(DEMO, boxes, mask, dots, LABELS, tmp_path / "sub" / "align.png",
                         title="An orange cat sits.", width_px=900)
    assert out.exists() and not list(out.parent.glob(".*tmp*"))
    pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert pic.shape[1] == 900
    # the strongest region's box is drawn in the top colour of the scale: sample its left edge
    scale = 0.9 * 900 / w  # image pixels -> figure pixels (the picture spans 90 % of the width)
    x = round(boxes[1, 0] * scale)
    y = round(45 + (boxes[1, 1] + boxes[1, 3]) / 2 * scale)  # 0.45 in title band at 100 dpi
    top = np.array(colormaps[CMAP](1.0)[:3]) * 255
    patch = pic[y - 1:y + 2, x - 2:x + 3].reshape(-1, 3)
    assert np.abs(patch - top).sum(1).min() < 40, patch


def test_a_sentence_that_aligns_nowhere_still_draws(tmp_path):
    boxes, mask, dots, _ = scene()
    out = draw_alignment(Image.open(DEMO), boxes, mask, -np.abs(dots), LABELS, tmp_path / "none.png")
    assert Image.open(out).size[0] == 900


def test_labels_stay_inside_the_picture_and_off_the_colour_bar(tmp_path):
    boxes, mask, dots, (w, h) = scene()
    boxes[1] = [w - 40, h - 30, w - 2, h - 2]  # a small region in the bottom-right corner, long labels
    labels = [triple_label("nmod", "somethinglong", "anotherlongword"), LABELS[1], LABELS[2]]
    out = draw_alignment(DEMO, boxes, mask, dots, labels, tmp_path / "corner.png", width_px=900)
    pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    gap = pic[:, int(0.9 * 900) + 2:int(0.925 * 900) - 1]  # between the picture's right edge and the colour bar
    assert (gap >= 250).all(), "a label runs past the picture's right edge"
