"""bottom-up-attention TSV features: ``--detector butd-tsv:PATH`` (a file, or a glob of split files).

Rows are tab-separated, without a header, one image a line, in either form (checked per row by field count):

    6 fields  (generate_tsv.py)  image_id, image_w, image_h, num_boxes, boxes, features
    10 fields (LXMERT)           img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
                                 num_boxes, boxes, features

``boxes`` is base64 of float32 (num_boxes, 4) xyxy pixels, ``features`` base64 of float32 (num_boxes, D);
LXMERT's ``objects_id``/``attrs_id`` are int64 and ``*_conf`` float32, (num_boxes,) each. Regions are chosen by
``objects_conf`` (descending) where the row has it, else the file's order.

Files are tens of GB, so nothing loads a file: one pass over the lines (reading only up to each line's first
tab) writes an index of (file, byte offset, length, line) per image id into the region cache folder, and each
shard then seeks to its own images' lines. Memory holds the index and one line at a time.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import glob
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import write_text_atomic
from . import SourceError
from .common import (IDENTITY_RULE, WHOLE_IMAGE_RULE, RowError, SourceRow, files_identity, match_images,
                     row_key)

log = logging.getLogger(__name__)

CLASSIC = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
          "boxes", "features")
SELECTION = "by objects_conf where the row has it (10-field rows), else the file's order (6-field rows)"
INDEX_FILE = "source-index.json"
_DIGITS = re.compile(r"(\d+)")


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in _DIGITS.split(p.name)]  # x.tsv.2 before x.tsv.10


def tsv_files(pattern: str) -> list[Path]:
    """The file, or the files a glob names, in natural order."""
    paths = [Path(p) for p in glob.glob(str(Path(pattern).expanduser()))] if glob.has_magic(pattern) else \
        [Path(pattern).expanduser()]
    paths = sorted((p for p in paths if p.is_file()), key=_natural)
    if not paths:
        raise SourceError(f"butd-tsv:{pattern}: no such file — give a TSV file or a glob of its parts, e.g. "
                          "'butd-tsv:features/trainval_36.tsv.*' (quote it for the shell)")
    return paths


@dataclass(frozen=True)
class Where:
    """Where an image's row is: file, byte offset and length of the line, line number."""

    path: Path
    offset: int
    length: int
    line: int
    truncated: bool = False  # the file ends inside this line (no newline)

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"


def _b64(raw: bytes, field: str, where: Where) -> bytes:
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"{where}: field {field!r} is not valid base64 ({e})") from None


def _array(raw: bytes, field: str, dtype, shape: tuple[int, ...], where: Where) -> np.ndarray:
    data = _b64(raw, field, where)
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != want:
        raise RowError(f"{where}: field {field!r} holds {len(data)} bytes, expected {want} for "
                       f"{np.dtype(dtype).name} {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def parse_row(line: bytes, where: Where, feature_dim: int | None) -> tuple[str, SourceRow]:
    """(image id, row) of one TSV line; RowError names the file, line and field when it is malformed.
    ``feature_dim`` None infers D from the row (used once, to describe the source)."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) == len(CLASSIC):
        names = CLASSIC
    elif len(fields) == len(LXMERT):
        names = LXMERT
    else:
        raise RowError(f"{where}: {len(fields)} tab-separated fields; expected 6 ({', '.join(CLASSIC)}) or 10 "
                       f"(LXMERT: {', '.join(LXMERT)})")
    f = dict(zip(names, fields))
    try:
        h, w = int(f.get("image_h", f.get("img_h"))), int(f.get("image_w", f.get("img_w")))
        n = int(f["num_boxes"])
    except ValueError:
        raise RowError(f"{where}: image height, width or num_boxes is not an integer") from None
    if n < 0 or h < 0 or w < 0:
        raise RowError(f"{where}: negative num_boxes, height or width")
    if feature_dim is None:
        nbytes = len(_b64(f["features"], "features", where))
        if n == 0 or nbytes % (4 * n):
            raise RowError(f"{where}: features of {nbytes} bytes do not split into {n} float32 rows")
        feature_dim = nbytes // (4 * n)
    boxes = _array(f["boxes"], "boxes", np.float32, (n, 4), where)
    feats = _array(f["features"], "features", np.float32, (n, feature_dim), where)
    scores = labels = None
    if names is LXMERT:
        scores = _array(f["objects_conf"], "objects_conf", np.float32, (n,), where)
        labels = _array(f["objects_id"], "objects_id", np.int64, (n,), where)
    image_id = (f.get("image_id") or f["img_id"]).decode("utf-8", "replace").strip()
    return image_id, SourceRow(h, w, boxes, feats, scores, labels)


def _feature_dim(paths: list[Path], lines: int = 20) -> int:
    """D of the files: the most common over the readable rows among the first ``lines`` lines of each file (the
    first of the most common on a tie), so one odd row at the start cannot set D for all the others."""
    dims: dict[int, int] = {}
    errors = []
    for p in paths:
        with open(p, "rb") as f:
            offset = 0
            for lineno in range(1, lines + 1):
                line = f.readline()
                if not line:
                    break
                where = Where(p, offset, len(line), lineno, not line.endswith(b"\n"))
                offset += len(line)
                try:
                    d = int(parse_row(line, where, None)[1].features.shape[1])
                    dims[d] = dims.get(d, 0) + 1
                except RowError as e:
                    errors.append(str(e))
        if dims:
            break
    if not dims:
        raise SourceError(f"butd-tsv: no readable row in the first lines of {paths[0]}"
                          + (f" ({errors[0]})" if errors else " (the files are empty)")
                          + " — is this a bottom-up-attention TSV?")
    return max(dims, key=dims.__getitem__)


def describe(pattern: str) -> dict[str, Any]:
    paths = tsv_files(pattern)
    return {"backend": "butd-tsv", "files": files_identity(paths), "file_identity": IDENTITY_RULE,
            "feature_dim": _feature_dim(paths), "selection": SELECTION, "whole_image": WHOLE_IMAGE_RULE}


# ------------------------------------------------------------------------------------------ the index

def build_index(paths: list[Path]) -> dict[str, Any]:
    """One pass over every line: row key -> [file number, offset, length, line, truncated]; lines without an
    image id are listed (first 100) and counted; a repeated id keeps its first row."""
    rows: dict[str, list] = {}
    bad: list[str] = []
    n_bad = dupes = 0
    for fi, p in enumerate(paths):
        offset = 0
        with open(p, "rb") as f:
            for lineno, line in enumerate(f, 1):  # buffered: memory is one line
                tab = line.find(b"\t")
                raw = line[:tab].decode("utf-8", "replace").strip() if tab > 0 else ""
                if raw:
                    key = row_key(raw)
                    if key in rows:
                        dupes += 1
                    else:
                        rows[key] = [fi, offset, len(line), lineno, not line.endswith(b"\n")]
                elif line.strip():
                    n_bad += 1
                    if len(bad) < 100:
                        bad.append(f"{p.name}:{lineno}: no image id before the first tab")
                offset += len(line)
    if dupes:
        log.warning("butd-tsv: %d image ids appear more than once; their first rows are used", dupes)
    return {"rows": rows, "unreadable_lines": n_bad, "unreadable_first": bad}


class TsvSource:
    def __init__(self, pattern: str, index_folder: Path | None = None):
        self.paths = tsv_files(pattern)
        self.identity = files_identity(self.paths)
        self.feature_dim = describe(pattern)["feature_dim"]
        self.index = self._load_index(index_folder)

    def _load_index(self, folder: Path | None) -> dict[str, Any]:
        if folder is None:
            return {"files": self.identity, **build_index(self.paths)}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / INDEX_FILE
        # Shard workers of one cache start together: the first to take the lock makes the one pass, the others
        # wait for it and read its index.
        with open(folder / f".{INDEX_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                try:
                    doc = json.loads(path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # damaged: it is only a cache
                    log.warning("%s cannot be read (%s: %s): indexing again", path, type(e).__name__, e)
                    doc = {}
                if isinstance(doc, dict) and doc.get("files") == self.identity and self._index_ok(doc):
                    return doc
            log.info("indexing %d TSV file(s): one pass, kept in %s", len(self.paths), path)
            doc = {"files": self.identity, **build_index(self.paths)}
            write_text_atomic(path, json.dumps(doc) + "\n")
            return doc

    def _index_ok(self, doc: dict) -> bool:
        """Every entry is [file number, offset, length, line, truncated] within the files: an index that parses
        but was edited or damaged is rebuilt, never trusted."""
        rows, sizes = doc.get("rows"), [f["bytes"] for f in self.identity]
        ok = isinstance(rows, dict) and isinstance(doc.get("unreadable_lines"), int) and all(
            isinstance(v, list) and len(v) == 5 and all(type(x) is int for x in v[:4])
            and 0 <= v[0] < len(sizes) and 0 <= v[1] and 0 < v[2] and v[1] + v[2] <= sizes[v[0]] and v[3] >= 1
            for v in rows.values())
        if not ok:
            log.warning("%s does not describe these files: indexing again", INDEX_FILE)
        return ok

    def locate(self, image_records) -> dict[str, Where]:
        rows = {k: Where(self.paths[v[0]], v[1], v[2], v[3], bool(v[4])) for k, v in self.index["rows"].items()}
        return match_images(image_records, rows)

    def missing(self, image_id: str) -> str:
        extra = ""
        if self.index["unreadable_lines"]:
            extra = (f"; {self.index['unreadable_lines']} line(s) had no image id (first: "
                     f"{self.index['unreadable_first'][0]})")
        return (f"no row for image {image_id!r} in {', '.join(p.name for p in self.paths)} (matched by image id, "
                f"file name without extension, or its trailing number){extra}")

    def read(self, where: Where) -> SourceRow:
        with open(where.path, "rb") as f:
            f.seek(where.offset)
            line = f.read(where.length)
        try:
            return parse_row(line, where, self.feature_dim)[1]
        except RowError as e:
            if where.truncated:
                raise RowError(f"{e}; the file ends inside this line (no final newline): it was probably cut "
                               "short — copy or download it again") from None
            raise


def open_source(pattern: str, index_folder=None) -> TsvSource:
    return TsvSource(pattern, Path(index_folder) if index_folder else None)
