"""Dataset readers: every source becomes one `Dataset` of images and captions."""
from __future__ import annotations

from pathlib import Path

from .records import SPLITS, CaptionRecord, Dataset, DatasetError, ImageRecord

DEMO_DIR = Path(__file__).resolve().parent / "demo"

__all__ = ["SPLITS", "CaptionRecord", "Dataset", "DatasetError", "ImageRecord", "DEMO_DIR", "load_dataset"]


def load_dataset(dataset: str, image_root: str | Path | None = None) -> Dataset:
    """Read a dataset by registered name ("demo") or by path.

    Paths: a Karpathy split JSON (``*.json``), a plain JSONL (``*.jsonl``, one caption per line), or
    Flickr8k's ``Flickr8k.token.txt`` (or the folder holding it, with the split lists beside it), or a SCAN /
    VSE++ precomp folder (or its ``test_caps.txt`` / ``testall_caps.txt``).
    ``image_root`` defaults to the folder of the dataset file (``images/`` beside it when that exists).
    """
    from .readers import read_dataset  # late: keeps `import data` cheap

    return read_dataset(dataset, image_root)
