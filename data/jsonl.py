"""A plain JSONL dataset, one caption per line:

    {"image": "dogs/1.jpg", "caption": "a dog runs on the grass", "split": "train"}
    {"image": "dogs/1.jpg", "caption": "...", "split": "train", "id": "dog1-b", "tokens": ["a", "dog", ...]}

``image`` is the path relative to the image root and is the image id; ``split`` is train/val/test (or restval,
dev); ``id`` (optional) is the caption id, else ``<image>#<n>`` with n counting that image's captions from 0;
``tokens`` (optional) a list of strings. Other fields are ignored. Blank lines are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checks import DatasetBuilder, image_path, split_name, text_lines, tokens_of
from .records import Dataset, DatasetError

REQUIRED = ("image", "caption", "split")


def read_jsonl(path: Path, image_root: Path, name: str) -> Dataset:
    out = DatasetBuilder(path)
    per_image: dict[str, int] = {}
    for lineno, line in text_lines(path):
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: malformed JSON at column {e.colno} ({e.msg}) — each line must be one "
                               'object like {"image": ..., "caption": ..., "split": ...}') from None
        except RecursionError:
            raise DatasetError(f"{where}: JSON nested too deeply — each line must be one flat object like "
                               '{"image": ..., "caption": ..., "split": ...}') from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise DatasetError(f"{where}: missing field {', '.join(map(repr, missing))} — every line needs "
                               f"{', '.join(map(repr, REQUIRED))}")
        image_id = image_path(rec["image"], where)
        out.add_image(image_id, image_id, split_name(rec["split"], where), where)
        n = per_image.get(image_id, 0)
        per_image[image_id] = n + 1
        caption_id = rec.get("id", f"{image_id}#{n}")
        if not isinstance(caption_id, (str, int)) or isinstance(caption_id, bool) or str(caption_id) == "":
            raise DatasetError(f"{where}: 'id' must be a non-empty string or integer, got {caption_id!r}")
        out.add_caption(str(caption_id), image_id, rec["caption"], tokens_of(rec.get("tokens"), where), where)
    return out.build(name, image_root)
