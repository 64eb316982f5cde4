"""What both sources share: a row's arrays, file identity, row-to-image matching, and writing one shard."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from .. import cache

log = logging.getLogger(__name__)

SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 * 1024
IDENTITY_RULE = f"sha256 of the size and {SAMPLE_BLOCKS} evenly spaced {SAMPLE_BYTES // 1024} KiB blocks"
WHOLE_IMAGE_RULE = "mean of the image's region features"


class RowError(ValueError):
    """One row of a feature file cannot be used (bad base64, wrong size, truncated); the image is recorded."""


@dataclass
class SourceRow:
    """One image's regions as a file gives them, in file order."""

    height: int
    width: int
    boxes: np.ndarray  # (n, 4) float32 xyxy pixels (zeros when the source has none)
    features: np.ndarray  # (n, D) float32
    scores: np.ndarray | None = None  # (n,) confidence, when the file has it (LXMERT's objects_conf)
    labels: np.ndarray | None = None  # (n,) class ids, when the file has them


# ------------------------------------------------------------------------------------------ file identity

@functools.lru_cache(maxsize=256)
def _sampled(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)  # first block at 0, last one ends at the end
            for i in range(SAMPLE_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def sampled_sha256(path: str | Path) -> str:
    """A content identity of a (possibly tens-of-GB) file in milliseconds: sha256 over its size and 64 blocks of
    64 KiB spread evenly over it (the whole file when smaller). Any change of size, start, end or a sampled block
    changes it; a same-size edit strictly between sampled blocks would not (a full sha256 of the bottom-up COCO
    TSV takes minutes, and every Luigi process computes the cache key when it schedules)."""
    st = os.stat(path)
    return _sampled(str(path), st.st_size, st.st_mtime_ns)


def files_identity(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Name (not location: identity is content), size and sampled hash of each file, in reading order."""
    return [{"name": p.name, "bytes": p.stat().st_size, "sampled_sha256": sampled_sha256(p)} for p in paths]


# ------------------------------------------------------------------------------------------ matching

_TRAILING_NUMBER = re.compile(r"(?:^|[_\-])0*(\d+)$")


def _number(text: str) -> str | None:
    m = _TRAILING_NUMBER.search(text)
    return m.group(1) or "0" if m else None


def row_key(raw: str) -> str:
    """A file's image id as a lookup key: numbers without leading zeros ("000391895" -> "391895")."""
    raw = raw.strip()
    return str(int(raw)) if raw.isdigit() else raw


def match_images(image_records: Iterable[Any], rows: Mapping[str, Any]) -> dict[str, Any]:
    """image id -> the location of its row, for dataset images whose id, path, file name without extension, or
    that name's trailing number equals a row key (``COCO_val2014_000000391895.jpg`` -> 391895;
    ``1000092795.jpg`` -> 1000092795). Earlier forms win; a form shared by two images is not used for either."""
    images = list(image_records)
    forms: list[Callable[[Any], str | None]] = [
        lambda im: im.image_id, lambda im: im.path, lambda im: Path(im.path).stem,
        lambda im: _number(Path(im.path).stem)]
    out: dict[str, Any] = {}
    taken: set[str] = set()  # a row feeds one image at most: a looser form never hands a matched row to another
    for form in forms:
        keys: dict[str, list[str]] = {}
        for im in images:
            if im.image_id in out:
                continue
            k = form(im)
            if k is not None:
                keys.setdefault(row_key(k), []).append(im.image_id)
        for k, ids in keys.items():
            if len(ids) == 1 and k in rows and k not in taken:
                out[ids[0]] = rows[k]
                taken.add(k)
    return out


# ------------------------------------------------------------------------------------------ one row

_INT32 = np.iinfo(np.int32)
BOX_SLACK = 1.0  # pixels a box may pass the image's edge (rounding); the usual extractors clip to the image


def check_row(row: SourceRow, where: Any) -> None:
    """Refuse a row whose numbers cannot be what the file claims (RowError naming the row and the value): sizes
    beyond int32, non-finite features, boxes or confidences, inverted boxes, boxes off the image (a row's width
    and height swapped, or boxes of another image), class ids beyond int32."""
    if not (0 <= row.height <= _INT32.max and 0 <= row.width <= _INT32.max):
        raise RowError(f"{where}: image size {row.width} x {row.height} is out of range: the row is damaged")
    feats = row.features
    if not np.isfinite(feats).all():
        r = int(np.flatnonzero(~np.isfinite(feats).all(1))[0])
        raise RowError(f"{where}: the file's features hold NaN or infinity (region {r}): the row is damaged; "
                       "extract or download the features again")
    boxes = np.asarray(row.boxes, np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        r = int(np.flatnonzero(~np.isfinite(boxes).all(1))[0])
        raise RowError(f"{where}: box {r} holds NaN or infinity ({boxes[r].tolist()}): the row is damaged")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if row.width > 0 and row.height > 0:
        lo, hi = -BOX_SLACK, np.array([row.width, row.height, row.width, row.height]) + BOX_SLACK
        bad |= ((boxes < lo) | (boxes > hi)).any(1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise RowError(f"{where}: box {r} {boxes[r].tolist()} (x1, y1, x2, y2) is not a box inside the row's "
                       f"{row.width} x {row.height} image ({int(bad.sum())} such): are the row's width and "
                       "height swapped, or the file damaged?")
    if row.scores is not None and not np.isfinite(row.scores).all():
        raise RowError(f"{where}: the region confidences hold NaN or infinity: the row is damaged")
    if row.labels is not None and len(row.labels) and not (
            (row.labels >= -1).all() and (row.labels <= _INT32.max).all()):
        raise RowError(f"{where}: class ids outside [-1, {_INT32.max}]: the row is damaged")


# ------------------------------------------------------------------------------------------ one shard

def write_source_shard(items: Sequence[tuple[str, Any]], read: Callable[[Any], SourceRow], out_path: str | Path,
                       *, producer: Mapping[str, Any], dataset: Mapping[str, Any], shard_index: int,
                       num_shards: int, feature_dtype: str, missing: Callable[[str], str],
                       stop_at_first: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Lay out each (image id, location) in the 20-row layout and write the shard; returns the failures.

    ``location`` None: the source has no row for the image (``missing(image_id)`` says why). A row that cannot be
    read (``RowError``) or has no region is recorded with its reason; the other images are written.
    ``stop_at_first``: raise RowError at the first such image instead (nothing is written)."""
    from ..regions import layout_fragments  # late: regions imports this package

    d = int(producer["feature_dim"])
    rows = cache.RegionRows()
    failed: dict[str, str] = {}
    bar = tqdm(items, desc=f"regions {Path(out_path).name}", unit="img", leave=False)
    for done, (image_id, where) in enumerate(bar, 1):
        try:
            if where is None:
                raise RowError(missing(image_id))
            row = read(where)
            n = len(row.features)
            if n == 0:
                raise RowError(f"{where}: the row has no regions")
            if row.features.shape[1] != d:
                raise RowError(f"{where}: {row.features.shape[1]}-d features, the source's are {d}-d")
            check_row(row, where)
            order_scores = row.scores if row.scores is not None else np.zeros(n, np.float32)  # stable: file order
            labels = row.labels if row.labels is not None else np.full(n, -1)
            frag = layout_fragments(row.height, row.width, row.boxes, order_scores, labels, row.features,
                                    row.features.mean(0))
            feats = frag["features"].astype(feature_dtype)
            if not np.isfinite(feats).all():  # finite in float32 (check_row): too large for float16
                raise RowError(f"{where}: features are not finite in {feature_dtype} (largest "
                               f"{np.abs(frag['features']).max():.3g}); use --feature-dtype float32")
        except Exception as e:  # noqa: BLE001 - whatever one row does, it costs only its image
            reason = str(e) if isinstance(e, RowError) else f"{where}: cannot be used ({type(e).__name__}: {e})"
            if stop_at_first:
                raise RowError(f"image {image_id!r}: {reason}") from None
            log.warning("image %r: %s", image_id, reason)
            failed[image_id] = reason
            continue
        rows.add(image_id, row.height, row.width, frag, feats)
        if progress and done % 200 == 0:
            progress(done, len(items))
    if progress:
        progress(len(items), len(items))
    rows.write(out_path, feature_dim=d, feature_dtype=feature_dtype, failed=failed, producer=producer,
               dataset=dataset, shard_index=shard_index, num_shards=num_shards)
    return failed
