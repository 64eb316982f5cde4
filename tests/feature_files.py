"""Write bottom-up-attention TSV files and SCAN precomp folders in exactly their published formats (for tests
and benchmarks): the same fields, dtypes and base64 encoding that generate_tsv.py and LXMERT's tools write."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

import numpy as np


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def image_regions(rng: np.random.Generator, n: int, dim: int, h: int = 375, w: int = 500):
    """(boxes (n, 4) float32 xyxy inside a h x w image, features (n, dim) float32 >= 0, conf (n,) float32)."""
    x0, y0 = rng.uniform(0, 0.6 * w, n), rng.uniform(0, 0.6 * h, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(10, 0.4 * w, n), y0 + rng.uniform(10, 0.4 * h, n)], 1)
    feats = np.maximum(rng.normal(size=(n, dim)), 0).astype(np.float32)
    return boxes.astype(np.float32), feats, rng.uniform(0.05, 1, n).astype(np.float32)


def tsv_line(image_id, boxes: np.ndarray, feats: np.ndarray, conf: np.ndarray | None = None,
             h: int = 375, w: int = 500) -> str:
    """One row: 6 fields (generate_tsv.py) without ``conf``, 10 fields (LXMERT) with it."""
    n = len(boxes)
    if conf is None:
        fields = [image_id, w, h, n, b64(boxes.astype(np.float32)), b64(feats.astype(np.float32))]
    else:
        ids = np.arange(n, dtype=np.int64)
        fields = [image_id, h, w, b64(ids), b64(conf.astype(np.float32)), b64(ids), b64(conf.astype(np.float32)),
                  n, b64(boxes.astype(np.float32)), b64(feats.astype(np.float32))]
    return "\t".join(str(f) for f in fields) + "\r\n"  # csv.writer's line end, as generate_tsv.py writes it


def write_tsv(path: Path, rows: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(rows), encoding="ascii", newline="")
    return path


def write_precomp(folder: Path, splits: dict[str, list[list[str]]], dim: int, regions: int = 36, seed: int = 0,
                  ids: dict[str, list[str]] | None = None, per_caption_rows: Sequence[str] = ()) -> dict:
    """``{split}_caps.txt`` (5 captions per image, image order), ``{split}_ims.npy`` float32 (N, regions, dim)
    and, when given, ``{split}_ids.txt``. ``per_caption_rows``: splits whose features repeat per caption
    (SCAN's im_div case). Returns split -> features (N, regions, dim)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, caps in splits.items():
        feats = np.maximum(rng.normal(size=(len(caps), regions, dim)), 0).astype(np.float32)
        out[split] = feats
        (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for five in caps for c in five))
        np.save(folder / f"{split}_ims.npy", np.repeat(feats, 5, 0) if split in per_caption_rows else feats)
        if ids and split in ids:
            (folder / f"{split}_ids.txt").write_text("".join(i + "\n" for i in ids[split]))
    return out
