"""The one in-memory form every dataset reader produces."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

# Karpathy's "restval" images are training images in every published setup; Flickr8k's "dev" is our "val".
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file, the line or record, and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    path: str  # relative to the dataset's image root, POSIX separators
    split: str  # one of SPLITS


@dataclass(frozen=True)
class CaptionRecord:
    caption_id: str
    image_id: str
    text: str
    tokens: tuple[str, ...] | None = None  # given by the source (Karpathy JSON); None means "parse the text"


@dataclass
class Dataset:
    name: str
    source: str  # the file it was read from
    image_root: Path
    images: list[ImageRecord]
    captions: list[CaptionRecord]
    _by_id: dict[str, ImageRecord] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {im.image_id: im for im in self.images}

    def image(self, image_id: str) -> ImageRecord:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in dataset {self.name!r} ({self.source})") from None

    def image_path(self, image_id: str) -> Path:
        return self.image_root / self.image(image_id).path

    def split_images(self, split: str) -> list[ImageRecord]:
        return [im for im in self.images if im.split == split]

    def split_captions(self, split: str) -> list[CaptionRecord]:
        ids = {im.image_id for im in self.split_images(split)}
        return [c for c in self.captions if c.image_id in ids]

    def captions_by_image(self) -> dict[str, list[CaptionRecord]]:
        out: dict[str, list[CaptionRecord]] = {im.image_id: [] for im in self.images}
        for c in self.captions:
            out[c.image_id].append(c)
        return out

    @cached_property
    def image_identity(self) -> str:
        """A short hash of the image ids and paths only: what region caches depend on."""
        h = hashlib.sha256()
        for im in self.images:
            h.update(json.dumps([im.image_id, im.path]).encode())
        return h.hexdigest()[:16]

    @cached_property
    def identity(self) -> str:
        """A short hash of the content (ids, paths, splits, texts): caches of another content never mix."""
        h = hashlib.sha256()
        for im in self.images:
            h.update(json.dumps([im.image_id, im.path, im.split]).encode())
        for c in self.captions:
            h.update(json.dumps([c.caption_id, c.image_id, c.text, c.tokens]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "images": len(self.images),
                "captions": len(self.captions)}
