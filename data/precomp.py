"""SCAN / VSE++ "precomp" folders (``f30k_precomp``, ``coco_precomp``): captions, and the rows of the features.

    {split}_caps.txt   one caption a line; lines 5i..5i+4 belong to image i       (train, dev, test, testall)
    {split}_ims.npy    float32 (N, 36, 2048) region features, one row per image (or one per caption: then the
                       rows of an image's 5 captions repeat it, SCAN's ``im_div`` case)
    {split}_ids.txt    optional: one image id a line (per image, or per caption: then each 5 repeat it)

``dev`` is our ``val``. The test split reads ``test_*`` (Flickr30K's 1,000 images; COCO's 1K) unless the dataset
path names ``testall_caps.txt`` (COCO's 5K, scored also as five 1K folds). Image id: the id from
``{split}_ids.txt``, else ``<file prefix>-<row>`` (``test-0``); caption id ``<image id>#<n>``. There are no image
files: the region source ``precomp:FOLDER`` reads the same folder's features by the same ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import DatasetBuilder, image_path, read_text
from .records import Dataset, DatasetError


PREFIXES = {"train": "train", "val": "dev", "test": "test"}  # our split -> file prefix
TEST_PREFIXES = ("test", "testall")
PER_IMAGE = 5


def is_precomp_folder(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*_caps.txt")) or any(path.glob("*_ims.npy")))


def caption_lines(path: Path) -> list[str]:
    """Every line of a caps file (a final newline adds no caption)."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def feature_rows(ims: Path) -> int:
    """Rows of a ``{split}_ims.npy`` without reading it (the array is memory-mapped)."""
    try:
        shape = np.load(ims, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file (an interrupted copy)
        raise DatasetError(f"{ims}: not a readable .npy array ({type(e).__name__}: {e}) — copy or download it "
                           "again") from None
    if not shape:
        raise DatasetError(f"{ims}: a single number, not an array of image features (images, regions, D)")
    return int(shape[0])


def image_stride(n_rows: int, n_caps: int, where: Path) -> tuple[int, int]:
    """(images, rows per image) of a features file with ``n_rows`` rows next to ``n_caps`` captions."""
    if n_caps == 0 or n_rows * PER_IMAGE == n_caps:
        return n_rows, 1
    if n_rows == n_caps and n_caps % PER_IMAGE == 0:
        return n_caps // PER_IMAGE, PER_IMAGE  # SCAN's im_div: one row per caption, an image's 5 rows repeat it
    raise DatasetError(f"{where}: {n_rows} feature rows do not fit {n_caps} captions (expected {n_caps // 5} rows, "
                       f"one per image of 5 captions, or {n_caps}, one per caption)")


def image_ids(folder: Path, prefix: str, n_images: int) -> list[str]:
    """Ids of a split's images: from ``{prefix}_ids.txt`` (per image or per caption), else ``<prefix>-<row>``."""
    ids_path = folder / f"{prefix}_ids.txt"
    if not ids_path.is_file():
        return [f"{prefix}-{i}" for i in range(n_images)]
    ids = [s.strip() for s in caption_lines(ids_path)]
    if len(ids) == n_images * PER_IMAGE and n_images:
        groups = [ids[i:i + PER_IMAGE] for i in range(0, len(ids), PER_IMAGE)]
        for i, g in enumerate(groups):
            if len(set(g)) != 1:
                raise DatasetError(f"{ids_path}:{i * PER_IMAGE + 1}: ids {g} of image {i}'s five captions differ "
                                   "— a per-caption id file repeats each image's id 5 times")
        ids = [g[0] for g in groups]
    if len(ids) != n_images:
        raise DatasetError(f"{ids_path}: {len(ids)} ids for {n_images} images — one id per image (or per caption)")
    for n, i in enumerate(ids, 1):
        if not i:
            raise DatasetError(f"{ids_path}:{n}: empty image id")
    return ids


@dataclass
class PrecompSplit:
    prefix: str  # file prefix: train, dev, test, testall
    image_ids: list[str]
    stride: int  # feature rows per image (1, or 5 when the features repeat per caption)
    caps: Path | None
    ims: Path | None


def read_split(folder: Path, prefix: str) -> PrecompSplit | None:
    """One prefix's files, or None when the folder has neither its captions nor its features."""
    caps, ims = folder / f"{prefix}_caps.txt", folder / f"{prefix}_ims.npy"
    caps, ims = (caps if caps.is_file() else None), (ims if ims.is_file() else None)
    if caps is None and ims is None:
        return None
    n_caps = len(caption_lines(caps)) if caps else 0
    if ims is not None:
        n_images, stride = image_stride(feature_rows(ims), n_caps, ims)
    else:
        if n_caps % PER_IMAGE:
            raise DatasetError(f"{caps}: {n_caps} captions are not 5 per image (lines 5i..5i+4 belong to image i)")
        n_images, stride = n_caps // PER_IMAGE, 1
    return PrecompSplit(prefix, image_ids(folder, prefix, n_images), stride, caps, ims)


def read_precomp(path: Path, image_root: Path, name: str) -> Dataset:
    """``path``: the folder, or its ``test_caps.txt`` / ``testall_caps.txt`` (which test captions to use)."""
    folder, test_prefix = (path, "test") if path.is_dir() else (path.parent, path.name.removesuffix("_caps.txt"))
    if test_prefix not in TEST_PREFIXES:
        raise DatasetError(f"{path}: give the precomp folder, or its test_caps.txt or testall_caps.txt to choose "
                           "the test captions")
    out = DatasetBuilder(folder)
    for split, prefix in {**PREFIXES, "test": test_prefix}.items():
        s = read_split(folder, prefix)
        if s is None or s.caps is None:
            continue
        ids = [image_path(image_id, f"{s.caps}: image {i}") for i, image_id in enumerate(s.image_ids)]
        for i, image_id in enumerate(ids):
            out.add_image(image_id, image_id, split, f"{s.caps}: image {i}")
        for j, text in enumerate(caption_lines(s.caps)):  # an empty line stays a caption (it has no triples)
            image_id = ids[j // PER_IMAGE]
            out.add_caption(f"{image_id}#{j % PER_IMAGE}", image_id, text, None, f"{s.caps}:{j + 1}")
    return out.build(name, image_root)
