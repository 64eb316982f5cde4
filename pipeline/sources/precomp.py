"""SCAN / VSE++ precomp features: ``--detector precomp:FOLDER`` reads ``{split}_ims.npy`` (N, 36, D) float32.

Every ``{split}_ims.npy`` of the folder (train, dev, test, testall) is memory-mapped, never loaded; an image's
row is found by the ids of ``data.precomp`` (``{split}_ids.txt``, else ``<split>-<row>``), so a precomp dataset
read from the same folder matches row for row, and a Karpathy JSON or JSONL dataset matches by image id or file
name when the folder has id files. The files hold no boxes, sizes or confidences: boxes are stored as zeros and
the regions keep the file's order (the first 19 of the 36).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.precomp import TEST_PREFIXES, read_split
from data.records import DatasetError

from . import SourceError
from .common import IDENTITY_RULE, WHOLE_IMAGE_RULE, RowError, SourceRow, files_identity, match_images, row_key

log = logging.getLogger(__name__)

FILE_PREFIXES = ("train", "dev") + TEST_PREFIXES
SELECTION = "the file's order (precomp features have no confidences)"


@dataclass(frozen=True)
class Where:
    path: Path
    row: int

    def __str__(self) -> str:
        return f"{self.path.name} row {self.row}"


def _splits(folder: str) -> list:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SourceError(f"precomp:{folder}: no such folder — give the folder holding {{split}}_ims.npy")
    try:
        splits = [s for p in FILE_PREFIXES if (s := read_split(root, p)) is not None and s.ims is not None]
    except DatasetError as e:
        raise SourceError(str(e)) from None
    if not splits:
        raise SourceError(f"precomp:{folder}: no {{split}}_ims.npy in the folder (looked for "
                          f"{', '.join(p + '_ims.npy' for p in FILE_PREFIXES)})")
    return splits


def _files(splits) -> list[Path]:
    files = []
    for s in splits:
        files.append(s.ims)
        ids = s.ims.with_name(f"{s.prefix}_ids.txt")
        if ids.is_file():
            files.append(ids)
    return files


def describe(folder: str) -> dict[str, Any]:
    splits = _splits(folder)
    shape = np.load(splits[0].ims, mmap_mode="r").shape
    if len(shape) != 3:
        raise SourceError(f"{splits[0].ims}: shape {shape}; precomp features are (images, regions, D)")
    return {"backend": "precomp", "files": files_identity(_files(splits)), "file_identity": IDENTITY_RULE,
            "feature_dim": int(shape[2]), "selection": SELECTION, "whole_image": WHOLE_IMAGE_RULE,
            "boxes": "none in the files: zeros"}


class PrecompSource:
    def __init__(self, folder: str, index_folder: Path | None = None):
        self.splits = _splits(folder)
        self.arrays = {s.prefix: np.load(s.ims, mmap_mode="r") for s in self.splits}  # (N, regions, D) each

    def locate(self, image_records) -> dict[str, Where]:
        rows: dict[str, Where] = {}
        for s in self.splits:
            for i, image_id in enumerate(s.image_ids):
                rows.setdefault(row_key(image_id), Where(s.ims, i * s.stride))  # test and testall share ids
        return match_images(image_records, rows)

    def missing(self, image_id: str) -> str:
        return (f"no row for image {image_id!r} in {', '.join(s.ims.name for s in self.splits)} (matched by the "
                "ids of {split}_ids.txt, else <split>-<row>)")

    def read(self, where: Where) -> SourceRow:
        prefix = where.path.name.removesuffix("_ims.npy")
        try:
            feats = np.asarray(self.arrays[prefix][where.row], np.float32)  # (regions, D): one row is read
        except (OSError, ValueError) as e:
            raise RowError(f"{where}: cannot be read ({e})") from None
        if feats.ndim != 2:
            raise RowError(f"{where}: shape {feats.shape}, expected (regions, D)")
        return SourceRow(0, 0, np.zeros((len(feats), 4), np.float32), feats)


def open_source(folder: str, index_folder=None) -> PrecompSource:
    return PrecompSource(folder, Path(index_folder) if index_folder else None)


__all__ = ["PrecompSource", "describe", "open_source"]
