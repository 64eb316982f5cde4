"""What every reader checks the same way: text decoding, image path form, split names, ids; then the Dataset.

Errors are ``DatasetError("<file>:<line>: <what> — <fix>")`` (or ``<file>: <record>: ...`` for JSON records),
raised where the problem is seen, so a user never gets a traceback from deep inside a reader.
"""
from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from .records import SPLIT_ALIASES, SPLITS, CaptionRecord, Dataset, DatasetError, ImageRecord

log = logging.getLogger(__name__)

_DRIVE = re.compile(r"^[A-Za-z]:")  # C:x, C:/x (backslash paths are refused before this)


def read_text(path: Path) -> str:
    """The file as text; a missing file or a byte that is not UTF-8 is a DatasetError naming file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file — check the dataset path") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is harmless
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(f"{path}:{line}: byte 0x{raw[e.start]:02x} at column {column} is not UTF-8 — "
                           "re-save the file as UTF-8") from None


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line without its end) for every non-blank line."""
    return [(n, line.rstrip("\r")) for n, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]


def storable(raw: str, where: str, what: str) -> str:
    """An id or path must be a string HDF5 caches and file systems take: no NUL, no lone surrogates (which JSON
    escapes such as "\\ud800" can produce). Refused here, where the file and line are known."""
    bad = "a NUL character" if "\0" in raw else ""
    if not bad:
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = f"a lone surrogate {raw[e.start]!r} (an invalid \\u escape)"
    if bad:
        raise DatasetError(f"{where}: {what} {raw!r:.80} contains {bad} — ids and paths must be valid text; fix "
                           "the record")
    return raw


def image_path(raw: object, where: str) -> str:
    """A normalised POSIX path relative to the image root; absolute paths and `..` escapes are refused.

    Only the form is checked here: a dataset file must not make the pipeline read outside its image root.
    Whether the file exists is the region extractor's business (it records missing images per image).
    """
    if not isinstance(raw, str) or not raw.strip():
        raise DatasetError(f"{where}: image path {raw!r} is not a non-empty string — give the image file's path "
                           "relative to the image root")
    fix = "give the path relative to the image root (pass --image-root for the folder it is under)"
    storable(raw, where, "image path")
    if "\\" in raw:
        raise DatasetError(f"{where}: image path {raw!r} contains a backslash — use '/' separators; {fix}")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise DatasetError(f"{where}: image path {raw!r} is absolute — {fix}")
    norm = posixpath.normpath(raw)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise DatasetError(f"{where}: image path {raw!r} leaves the image root — {fix}")
    return norm


def split_name(raw: object, where: str) -> str:
    """One of SPLITS (aliases: restval -> train, dev -> val)."""
    split = SPLIT_ALIASES.get(raw) if isinstance(raw, str) else None
    if split is None:
        raise DatasetError(f"{where}: unknown split {raw!r} — use one of {', '.join(sorted(SPLIT_ALIASES))}")
    return split


def tokens_of(raw: object, where: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise DatasetError(f"{where}: 'tokens' must be a list of strings, got {raw!r:.60}")
    return tuple(raw)


class DatasetBuilder:
    """Collects images and captions with where each came from, so a conflict names both places."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.images: dict[str, tuple[ImageRecord, str]] = {}  # image id -> (record, where)
        self.captions: dict[str, tuple[CaptionRecord, str]] = {}  # caption id -> (record, where)

    def add_image(self, image_id: str, path: str, split: str, where: str) -> None:
        storable(image_id, where, "image id")
        storable(path, where, "image path")
        new = ImageRecord(image_id, path, split)
        old = self.images.get(image_id)
        if old is None:
            self.images[image_id] = (new, where)
        elif old[0] != new:
            raise DatasetError(f"{where}: image {image_id!r} is given split {split!r} (path {path!r}) but "
                               f"{old[1]} gave split {old[0].split!r} (path {old[0].path!r}) — an image belongs "
                               "to one split; make them agree")

    def add_caption(self, caption_id: str, image_id: str, text: object, tokens: tuple[str, ...] | None,
                    where: str) -> None:
        # Empty and whitespace-only captions are kept: they are stored with no triples and counted. Any text
        # is stored exactly (NUL and lone surrogates included), so only ids are checked for storability.
        if not isinstance(text, str):
            raise DatasetError(f"{where}: caption text {text!r:.60} is not a string — give the sentence, or "
                               "remove the record")
        storable(caption_id, where, "caption id")
        if caption_id in self.captions:
            raise DatasetError(f"{where}: caption id {caption_id!r} was already used at "
                               f"{self.captions[caption_id][1]} — caption ids must be unique")
        self.captions[caption_id] = (CaptionRecord(caption_id, image_id, text.strip(), tokens), where)

    def build(self, name: str, image_root: Path) -> Dataset:
        """The Dataset; refuses one without images or captions and one whose captions name unknown images."""
        if not self.images or not self.captions:
            raise DatasetError(f"{self.source}: the dataset is empty ({len(self.images)} images with a split, "
                               f"{len(self.captions)} captions) — check that the file is the right one")
        for cap, where in self.captions.values():
            if cap.image_id not in self.images:
                raise DatasetError(f"{where}: caption {cap.caption_id!r} belongs to image {cap.image_id!r}, "
                                   "which has no split — give the image a split")
        images = [im for im, _ in self.images.values()]
        ds = Dataset(name=name, source=str(self.source), image_root=image_root, images=images,
                     captions=[c for c, _ in self.captions.values()])
        sizes = {s: len(ds.split_images(s)) for s in SPLITS}
        if not image_root.is_dir():
            log.warning("dataset %s: image root %s is not a folder; stages that read images will fail",
                        name, image_root)
        if empty := [s for s, k in sizes.items() if k == 0]:
            log.warning("dataset %s (%s) has no %s images", name, self.source, "/".join(empty))
        log.info("dataset %s: %d images (%s), %d captions, from %s", name, len(images),
                 ", ".join(f"{s} {k}" for s, k in sizes.items()), len(ds.captions), self.source)
        return ds
