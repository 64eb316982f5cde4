"""Region sources that read features someone else computed, behind the detector's place in the pipeline.

    --detector butd-tsv:PATH      bottom-up-attention TSV rows (a file, or a glob of split files *.tsv.0 ...)
    --detector precomp:FOLDER     SCAN / VSE++ precomp features ({split}_ims.npy, optional {split}_ids.txt)

A source fills the same 20-row layout as a detector (``pipeline.regions.layout_fragments``): row 0 is the whole
image, here the **mean of the image's region features** (the files hold no whole-image feature), then up to 19
regions, padding masked. No image is opened: a source needs neither image files nor detector weights.

Its producer record (the region cache key) holds the files' names, sizes and sampled content hashes
(``pipeline.sources.files``), the selection rule and the whole-image rule, so other files or another rule write
a new cache folder.
"""
from __future__ import annotations

from typing import Any

SOURCE_PREFIXES = ("butd-tsv:", "precomp:")


class SourceError(RuntimeError):
    """A feature source cannot be read as asked; the message names the file and what to do."""


def is_source(name: str) -> bool:
    """True for ``--detector`` values that read features instead of running a model."""
    return str(name).startswith(SOURCE_PREFIXES)


def _module(name: str):
    if name.startswith("butd-tsv:"):
        from . import butd_tsv

        return butd_tsv
    if name.startswith("precomp:"):
        from . import precomp

        return precomp
    raise SourceError(f"unknown region source {name!r}: use butd-tsv:PATH or precomp:FOLDER")


def _argument(name: str) -> str:
    arg = name.split(":", 1)[1]
    if not arg:
        raise SourceError(f"--detector {name!r} names no file: give butd-tsv:PATH (a file or a glob) or "
                          "precomp:FOLDER")
    return arg


def describe_source(name: str) -> dict[str, Any]:
    """The producer fields of a source (backend, files and their identity, feature size, rules)."""
    return _module(name).describe(_argument(name))


def open_source(name: str, index_folder=None):
    """A reader with ``locate(image_ids) -> {image id: location}`` and ``read(location) -> SourceRow``.

    ``index_folder``: where a source may keep an index of its files (the region cache folder)."""
    return _module(name).open_source(_argument(name), index_folder)


__all__ = ["SOURCE_PREFIXES", "SourceError", "describe_source", "is_source", "open_source"]
