"""The HDF5 cache format: the one place that knows the shard schema (both stages use it).

Region shard (``kind = "regions"``), N images, K = 20 fragments each:
    image_ids   (N,)        str
    image_hw    (N, 2)      int32     original height, width
    boxes       (N, K, 4)   float32   xyxy in original image pixels
    scores      (N, K)      float32   detector score (1.0 for the whole image, 0 for padding)
    labels      (N, K)      int32     detector class (-1 for the whole image and for padding)
    mask        (N, K)      bool      True for a real fragment
    features    (N, K, D)   float16 | float32
Row ``WHOLE_IMAGE_ROW`` (0) is always the whole image; rows 1..19 hold the detections by descending score,
then padding (mask False, zeros).

Triple shard (``kind = "triples"``), M captions, T triples in all:
    caption_ids, image_ids, texts  (M,)   str
    offsets                        (M+1,) int64   triples of caption m are rows offsets[m]:offsets[m+1]
    num_tokens                     (M,)   int32
    truncated                      (M,)   bool    the caption was cut to the parser's limit
    rel, head, dep                 (T,)   str     lowercased relation, head word, dependent word
    head_lemma, dep_lemma          (T,)   str
    head_pos, dep_pos              (T,)   int32   1-based token positions in the caption

Both kinds may carry ``failed_ids`` / ``failed_reasons`` (str): records that could not be processed.

Every shard has attributes: schema_version, kind, producer (JSON), dataset (JSON), created, libraries (JSON),
shard_index, num_shards. Shards are written to a temporary name in the same folder and renamed when complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
K_FRAGMENTS = 20  # the paper: top 19 detections + the whole image
WHOLE_IMAGE_ROW = 0
STR = h5py.string_dtype(encoding="utf-8")

_STRING_FIELDS = {"image_ids", "caption_ids", "texts", "rel", "head", "dep", "head_lemma", "dep_lemma",
                  "failed_ids", "failed_reasons"}


class CacheError(RuntimeError):
    """A cache file is missing, damaged, or was produced by something other than what the caller asked for."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(content: Mapping[str, Any], length: int = 12) -> str:
    """A short stable hash of everything that changes a cache's content: the name of its folder."""
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:length]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_ranges(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard; an empty dataset still has no shards."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, Markdown) through a temporary name in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a model file (the identity caches record), remembered per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for lib in ("h5py", "numpy", "torch", "torchvision", "stanza", "detectron2"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[lib] = md.version(lib)
    out["hdf5"] = h5py.version.hdf5_version
    return out


@dataclass
class ShardInfo:
    path: Path
    kind: str
    schema_version: int
    producer: dict
    dataset: dict
    shard_index: int
    num_shards: int
    created: str
    libraries: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- writing

def _chunks(arr: np.ndarray) -> tuple[int, ...] | None:
    """Chunk along the first axis so one record (an image's 20 x D block) is read without the rest."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        return None
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else arr.itemsize)
    rows = int(max(1, min(arr.shape[0], (256 * 1024) // row_bytes)))
    return (rows,) + tuple(arr.shape[1:])


def write_shard(path: str | Path, kind: str, arrays: Mapping[str, Any], *, producer: Mapping[str, Any],
                dataset: Mapping[str, Any], shard_index: int, num_shards: int) -> Path:
    """Write one shard atomically: a temporary file in the same folder, renamed over ``path`` when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for name, value in arrays.items():
                if name in _STRING_FIELDS:
                    data = np.asarray(list(value), dtype=object)
                    f.create_dataset(name, data=data, dtype=STR, chunks=_chunks(data) if data.size else None)
                else:
                    data = np.asarray(value)
                    f.create_dataset(name, data=data, chunks=_chunks(data))
            f.attrs.update({
                "schema_version": SCHEMA_VERSION,
                "kind": kind,
                "producer": canonical_json(producer),
                "dataset": canonical_json(dataset),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "libraries": canonical_json(library_versions()),
                "shard_index": shard_index,
                "num_shards": num_shards,
            })
        os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole new file
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_region_shard(path: str | Path, *, image_ids, image_hw, boxes, scores, labels, mask, features,
                       failed_ids=(), failed_reasons=(), producer, dataset, shard_index: int,
                       num_shards: int) -> Path:
    n = len(image_ids)
    feats = np.asarray(features)
    checks = {"image_hw": (image_hw, (n, 2), np.int32), "boxes": (boxes, (n, K_FRAGMENTS, 4), np.float32),
              "scores": (scores, (n, K_FRAGMENTS), np.float32), "labels": (labels, (n, K_FRAGMENTS), np.int32),
              "mask": (mask, (n, K_FRAGMENTS), bool)}
    arrays: dict[str, Any] = {"image_ids": image_ids}
    for name, (value, shape, dtype) in checks.items():
        arr = np.asarray(value, dtype)
        if arr.size == 0 and n == 0:
            arr = arr.reshape(shape)  # an empty shard may be given empty lists
        if arr.shape != shape:
            raise ValueError(f"region shard {path}: {name} has shape {arr.shape}, expected {shape}")
        arrays[name] = arr
    if feats.ndim != 3 or feats.shape[:2] != (n, K_FRAGMENTS):
        raise ValueError(f"region shard {path}: features have shape {feats.shape}, expected ({n}, {K_FRAGMENTS}, D)")
    arrays["features"] = feats
    arrays["failed_ids"] = list(failed_ids)
    arrays["failed_reasons"] = list(failed_reasons)
    return write_shard(path, "regions", arrays, producer=producer, dataset=dataset,
                       shard_index=shard_index, num_shards=num_shards)


def write_triple_shard(path: str | Path, *, caption_ids, image_ids, texts, triples, num_tokens=None,
                       truncated=None, failed_ids=(), failed_reasons=(), producer, dataset, shard_index: int,
                       num_shards: int) -> Path:
    """``triples[m]`` is a list of (rel, head, dep, head_lemma, dep_lemma, head_pos, dep_pos) for caption m."""
    m = len(caption_ids)
    if not (len(image_ids) == len(texts) == len(triples) == m):
        raise ValueError(f"triple shard {path}: caption_ids, image_ids, texts and triples differ in length")
    offsets = np.zeros(m + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in triples])
    flat = [t for ts in triples for t in ts]
    cols = list(zip(*flat)) if flat else [()] * 7
    arrays = {"caption_ids": caption_ids, "image_ids": image_ids, "texts": texts, "offsets": offsets,
              "num_tokens": np.asarray(num_tokens if num_tokens is not None else [0] * m, np.int32),
              "truncated": np.asarray(truncated if truncated is not None else [False] * m, bool),
              "rel": cols[0], "head": cols[1], "dep": cols[2], "head_lemma": cols[3], "dep_lemma": cols[4],
              "head_pos": np.asarray(cols[5], np.int32), "dep_pos": np.asarray(cols[6], np.int32),
              "failed_ids": list(failed_ids), "failed_reasons": list(failed_reasons)}
    return write_shard(path, "triples", arrays, producer=producer, dataset=dataset,
                       shard_index=shard_index, num_shards=num_shards)


# ---------------------------------------------------------------------------------------------------- reading

def shard_info(f: h5py.File) -> ShardInfo:
    a = f.attrs
    missing = [k for k in ("kind", "schema_version", "producer", "dataset", "shard_index", "num_shards",
                           "created") if k not in a]
    if missing:
        raise CacheError(f"{f.filename}: not a defrag cache shard (attribute {missing[0]!r} missing); delete it "
                         "and rerun the stage-1 task that writes it")
    try:
        return ShardInfo(path=Path(f.filename), kind=str(a["kind"]), schema_version=int(a["schema_version"]),
                         producer=json.loads(a["producer"]), dataset=json.loads(a["dataset"]),
                         shard_index=int(a["shard_index"]), num_shards=int(a["num_shards"]),
                         created=str(a["created"]), libraries=json.loads(a.get("libraries", "{}")))
    except (TypeError, ValueError) as e:
        raise CacheError(f"{f.filename}: damaged shard attributes ({e}); delete it and rerun the stage-1 task "
                         "that writes it") from None


def check_shard(info: ShardInfo, kind: str, producer: Mapping[str, Any] | None = None,
                dataset: Mapping[str, Any] | None = None) -> None:
    """Refuse a shard of another kind, schema, producer or dataset, naming both values."""
    where = f"cache shard {info.path}"
    if info.kind != kind:
        raise CacheError(f"{where} holds {info.kind!r}, expected {kind!r}")
    if info.schema_version != SCHEMA_VERSION:
        raise CacheError(f"{where} has schema version {info.schema_version}, this defrag reads "
                         f"{SCHEMA_VERSION}: rebuild the cache (delete the folder and rerun stage 1)")
    if producer is not None and canonical_json(info.producer) != canonical_json(producer):
        raise CacheError(f"{where} was produced by {canonical_json(info.producer)}, but the caller asked for "
                         f"{canonical_json(producer)}: use the matching cache folder or rerun stage 1")
    if dataset is not None and canonical_json(info.dataset) != canonical_json(dataset):
        raise CacheError(f"{where} belongs to dataset {canonical_json(info.dataset)}, but the caller asked for "
                         f"{canonical_json(dataset)}")


@contextlib.contextmanager
def open_shard(path: str | Path, kind: str, producer: Mapping[str, Any] | None = None,
               dataset: Mapping[str, Any] | None = None) -> Iterator[h5py.File]:
    """Open a finished shard read-only after checking kind, schema and (when given) producer and dataset.

    Datasets are read lazily: ``f["features"][i]`` reads one image's block, not the file.
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache shard {path} does not exist: run the stage-1 task that writes it")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"cache shard {path} cannot be read ({e}): delete it and rerun stage 1") from None
    try:
        check_shard(shard_info(f), kind, producer, dataset)
        yield f
    finally:
        f.close()


def read_strings(dset: h5py.Dataset, sel: Any = slice(None)) -> list[str]:
    if dset.shape == (0,) or dset.shape is None:
        return []
    return list(dset.asstr()[sel])


@dataclass
class RegionBlock:
    """Fragments of a run of images, as numpy arrays (shapes as in the module docstring)."""
    image_ids: list[str]
    image_hw: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    features: np.ndarray
    failed: dict[str, str] = field(default_factory=dict)


def read_region_shard(path: str | Path, producer=None, dataset=None, with_features: bool = True) -> RegionBlock:
    with open_shard(path, "regions", producer, dataset) as f:
        ids = read_strings(f["image_ids"])
        feats = f["features"][()] if with_features else np.zeros((len(ids), K_FRAGMENTS, 0), np.float16)
        return RegionBlock(ids, f["image_hw"][()], f["boxes"][()], f["scores"][()], f["labels"][()],
                           f["mask"][()], feats, _failures(f))


@dataclass
class TripleBlock:
    """Triples of a run of captions: flat string arrays and per-caption offsets."""
    caption_ids: list[str]
    image_ids: list[str]
    texts: list[str]
    offsets: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray
    rel: list[str]
    head: list[str]
    dep: list[str]
    head_lemma: list[str]
    dep_lemma: list[str]
    head_pos: np.ndarray
    dep_pos: np.ndarray
    failed: dict[str, str] = field(default_factory=dict)

    def triples(self, m: int) -> list[tuple[str, str, str]]:
        """(relation, head, dependent) of caption m."""
        a, b = int(self.offsets[m]), int(self.offsets[m + 1])
        return list(zip(self.rel[a:b], self.head[a:b], self.dep[a:b]))


def read_triple_shard(path: str | Path, producer=None, dataset=None) -> TripleBlock:
    with open_shard(path, "triples", producer, dataset) as f:
        s = {k: read_strings(f[k]) for k in ("caption_ids", "image_ids", "texts", "rel", "head", "dep",
                                             "head_lemma", "dep_lemma")}
        return TripleBlock(offsets=f["offsets"][()], num_tokens=f["num_tokens"][()], truncated=f["truncated"][()],
                           head_pos=f["head_pos"][()], dep_pos=f["dep_pos"][()], failed=_failures(f), **s)


def _failures(f: h5py.File) -> dict[str, str]:
    if "failed_ids" not in f:
        return {}
    return dict(zip(read_strings(f["failed_ids"]), read_strings(f["failed_reasons"])))


def list_shards(folder: str | Path) -> list[Path]:
    """Finished shards of a cache folder, in order (temporary files are never listed)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("shard-*.h5")) if folder.is_dir() else []


def cache_folder(cache_dir: str | Path, kind: str, dataset_name: str, content: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<kind>/<dataset>-<key>``: a new configuration writes beside the old one, never into it.

    ``content`` must hold everything that changes the shards (producer, dataset identity, shard size).
    The folder gets a ``cache.json`` describing that content, for people browsing the cache.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(dataset_name).stem) or "dataset"
    folder = Path(cache_dir) / kind / f"{safe}-{cache_key(content)}"
    meta = folder / "cache.json"
    if not meta.exists():
        write_text_atomic(meta, json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")
    return folder
