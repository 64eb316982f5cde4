"""The published DeFrag figures, shown beside a run's own (never mixed with them) when the dataset is known.

Numbers from Karpathy, Joulin, Fei-Fei, "Deep Fragment Embeddings for Bidirectional Image Sentence Mapping",
NIPS 2014 (arXiv:1406.5679), Flickr8K and Flickr30K tables: R@1/5/10 in %, median rank; the protocol is the
1,000 test images x 5 sentences of each dataset. The paper has no COCO results. The R@K figures were checked
against the project's reference notes on the paper; the median ranks are as transcribed from the paper's tables
and were not re-checked against a second copy.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

CITATION = ("Karpathy, Joulin, Fei-Fei, Deep Fragment Embeddings for Bidirectional Image Sentence Mapping, "
            "NIPS 2014 (arXiv:1406.5679)")

# dataset -> row name -> (annotation R@1, R@5, R@10, med r, search R@1, R@5, R@10, med r)
_ROWS: dict[str, dict[str, tuple[float, ...]]] = {
    "flickr8k": {"DeFrag (paper)": (12.6, 32.9, 44.0, 14, 9.7, 29.6, 42.5, 15)},
    "flickr30k": {"DeFrag (paper)": (14.2, 37.7, 51.3, 10, 10.2, 30.8, 44.2, 14),
                  "DeFrag, fine-tuned CNN (paper)": (16.4, 40.2, 54.7, 8, 10.3, 31.4, 44.5, 13)},
    "coco": {},
}
LABELS = {"flickr8k": "Flickr8K", "flickr30k": "Flickr30K", "coco": "COCO"}
# Karpathy-split image counts (train incl. restval, val, test); precomp folders have the same ones
_SIZES = {(6000, 1000, 1000): "flickr8k", (29000, 1014, 1000): "flickr30k", (29000, 1000, 1000): "flickr30k",
          (113287, 5000, 5000): "coco", (113287, 5000, 1000): "coco", (82783, 5000, 5000): "coco"}
_NAMES = [(re.compile(r"flickr[-_]?8k|f8k", re.I), "flickr8k"), (re.compile(r"flickr[-_]?30k|f30k", re.I), "flickr30k"),
          (re.compile(r"coco", re.I), "coco")]


def recognise(name: str, split_sizes: Mapping[str, int]) -> str | None:
    """flickr8k / flickr30k / coco from the dataset's name, else from its Karpathy-split sizes; None otherwise."""
    for pattern, key in _NAMES:
        if pattern.search(name or ""):
            return key
    return _SIZES.get((split_sizes.get("train", 0), split_sizes.get("val", 0), split_sizes.get("test", 0)))


def published(name: str, split_sizes: Mapping[str, int]) -> dict[str, Any] | None:
    """``{"dataset", "label", "citation", "rows": {row: {"annotation": {r1, r5, r10, medr}, "search": ...}}}``
    (recalls as fractions, as the measured metrics hold them), or None for an unknown dataset."""
    key = recognise(name, split_sizes)
    if key is None:
        return None
    rows = {}
    for row, v in _ROWS[key].items():
        rows[row] = {d: {"r1": round(v[o] / 100, 4), "r5": round(v[o + 1] / 100, 4),
                         "r10": round(v[o + 2] / 100, 4), "medr": v[o + 3]}
                     for d, o in (("annotation", 0), ("search", 4))}
    return {"dataset": key, "label": LABELS[key], "citation": CITATION, "rows": rows,
            "protocol": "the test split's 1,000 images x 5 sentences"}


__all__ = ["CITATION", "published", "recognise"]
