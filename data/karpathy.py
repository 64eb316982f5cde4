"""Karpathy's split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json).

    {"images": [{"filename": "x.jpg", "filepath": "val2014", "split": "restval",
                 "sentences": [{"raw": "A dog runs .", "tokens": ["a", "dog", "runs"], ...}, ...], ...}, ...],
     "dataset": "coco"}

Image id = image path = ``filepath/filename`` (``filename`` alone when there is no filepath), relative to the
image root. Caption id = ``<image id>#<n>``, n the sentence's position in the image's list: the same id that
Flickr8k's own token file uses, so the two sources of Flickr8k name captions alike (``sentid`` is only a
running number inside the file). ``restval`` images are training images.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checks import DatasetBuilder, image_path, read_text, split_name, tokens_of
from .records import Dataset, DatasetError


def read_karpathy_json(path: Path, image_root: Path, name: str) -> Dataset:
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}) — fix the file or "
                           "download it again") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to be a Karpathy split file — fix the file or "
                           "download it again") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path}: no top-level 'images' list — not a Karpathy split JSON (expected "
                           '{"images": [{"filename", "split", "sentences"}, ...]})')
    out = DatasetBuilder(path)
    for i, rec in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object, got {type(rec).__name__}")
        missing = [k for k in ("filename", "split", "sentences") if k not in rec]
        if missing:
            raise DatasetError(f"{where}: missing field {', '.join(map(repr, missing))} — every image needs "
                               "'filename', 'split' and 'sentences'")
        where = f"{path}: images[{i}] ({rec['filename']!r})"
        filename, filepath = rec["filename"], rec.get("filepath") or ""
        if not isinstance(filename, str) or not isinstance(filepath, str):
            raise DatasetError(f"{where}: 'filename' and 'filepath' must be strings")
        rel = f"{filepath}/{filename}" if filepath else filename
        image_id = image_path(rel, where)
        if image_id in out.images:
            raise DatasetError(f"{where}: image {image_id!r} is listed twice (first at {out.images[image_id][1]})"
                               " — merge the two records")
        out.add_image(image_id, image_id, split_name(rec["split"], where), where)
        sentences = rec["sentences"]
        if not isinstance(sentences, list):
            raise DatasetError(f"{where}: 'sentences' must be a list, got {type(sentences).__name__}")
        for n, sent in enumerate(sentences):
            swhere = f"{where} sentences[{n}]"
            if not isinstance(sent, dict) or "raw" not in sent:
                raise DatasetError(f"{swhere}: missing field 'raw' — every sentence needs its raw text")
            out.add_caption(f"{image_id}#{n}", image_id, sent["raw"], tokens_of(sent.get("tokens"), swhere),
                            swhere)
    return out.build(name, image_root)
