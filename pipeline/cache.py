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

Strings (every ``str`` column above) are stored as their UTF-8 bytes, one flat uint8 dataset ``<name>`` plus
``<name>_offsets`` (n+1,) int64, so any text is stored exactly (NUL, lone surrogates via ``surrogatepass``) and
checksummed like the rest; ``read_strings`` gives them back as Python strings.

Damage is detected: every chunked dataset carries the fletcher32 checksum filter (a flipped byte fails the read,
which ``open_shard`` turns into a CacheError naming the shard and the fix), the object headers carry HDF5's own
metadata checksums (file format v110+), and the superblock records the end-of-file address, so a truncated file
does not open. The attribute ``complete`` is written last; ``shard_complete`` is what the tasks' ``complete()``
ask, so a truncated or unfinished shard is recomputed by the next run. ``python -m pipeline.verify`` reads every
chunk of a whole cache.

Every shard has attributes: schema_version, kind, producer (JSON), dataset (JSON), created, libraries (JSON),
shard_index, num_shards, complete. A shard is built in memory and written to a temporary name in the same folder
(after checking the free space it needs), then renamed: the HDF5 library never writes to the disk itself, so a
full or read-only disk is a plain OSError that becomes one CacheError line (folder, space needed, fix), and no
half-open HDF5 file is left for the interpreter's exit.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: strings as UTF-8 bytes + offsets, fletcher32 checksums, the `complete` attribute
K_FRAGMENTS = 20  # the paper: top 19 detections + the whole image
WHOLE_IMAGE_ROW = 0

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


SPACE_MARGIN = 64 << 10  # bytes kept free beyond what a file needs (file system metadata)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def storage_error(folder: Path, name: str, e: OSError, needed: int = 0) -> CacheError:
    """One line naming the folder, what was being written, the space it needs and the fix."""
    what = f"{folder}: cannot write {name}" + (f" ({_mb(needed)})" if needed else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(folder)
        return CacheError(f"{what}: no space left on the device ({_mb(free)} free) — free at least "
                          f"{_mb(max(needed + SPACE_MARGIN - free, SPACE_MARGIN))} there, or pass another folder "
                          "(--cache-dir / --run-dir) on a disk with room")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(f"{what}: the folder is read-only ({e.strerror}) — make it writable, or pass a writable "
                          "folder (--cache-dir / --run-dir)")
    return CacheError(f"{what}: {e.strerror or e} — check the disk and rerun")


def _free_bytes(folder: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free
    return 0


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p`` whose failure (read-only, full disk) is one CacheError line with the fix."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(folder, "a folder", e) from None
    return folder


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    """Write a file through a temporary name in the same folder, fsync and a rename; refuse up front when the
    disk lacks the space, and never leave the temporary file behind."""
    path = Path(path)
    folder = make_folder(path.parent)
    if path.name != "cache.json":
        describe_folder(folder)  # work starts in a cache folder: it gets its cache.json first
    needed = len(data)
    free = _free_bytes(folder)
    if free and free < needed + SPACE_MARGIN:
        raise storage_error(folder, path.name, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole new file
    except OSError as e:
        raise storage_error(folder, path.name, e, needed) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, Markdown) through a temporary name in the same folder and a rename.
    A lone surrogate is written as its escape \\udXXXX: valid UTF-8, and in JSON the very same string."""
    return write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


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


def encode_strings(values: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Strings -> (flat UTF-8 bytes (B,) uint8, offsets (n+1,) int64, how many held NUL or lone surrogates).

    Lone surrogates (from JSON escapes such as "\\ud800") are kept exactly with ``surrogatepass``; NUL is a byte
    like any other. Nothing is dropped or replaced: ``decode_strings`` gives back the same strings."""
    encoded, odd = [], 0
    for v in values:
        s = v if isinstance(v, str) else str(v)
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError:
            b = s.encode("utf-8", "surrogatepass")
            odd += 1
        else:
            odd += b"\0" in b
        encoded.append(b)
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets, odd


def decode_strings(flat: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(flat, np.uint8).tobytes()
    o = np.asarray(offsets, np.int64).tolist()
    return [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(o[:-1], o[1:])]


def _dataset(f: h5py.File, name: str, data: np.ndarray) -> None:
    chunks = _chunks(data)  # fletcher32 needs chunks: every non-empty dataset is checksummed
    f.create_dataset(name, data=data, chunks=chunks, fletcher32=chunks is not None)


def shard_bytes(kind: str, arrays: Mapping[str, Any], *, producer: Mapping[str, Any], dataset: Mapping[str, Any],
                shard_index: int, num_shards: int, path: str | Path = "") -> bytes:
    """One whole shard file, built in memory (the ``complete`` attribute last)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=("v110", "latest")) as f:  # v110+: checksummed object headers
        for name, value in arrays.items():
            if name in _STRING_FIELDS:
                flat, offsets, odd = encode_strings(value)
                if odd:
                    log.warning("shard %s: %d %s value(s) hold NUL or lone surrogates; stored exactly as given",
                                path, odd, name)
                _dataset(f, name, flat)
                _dataset(f, f"{name}_offsets", offsets)
            else:
                _dataset(f, name, np.asarray(value))
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
        f.attrs["complete"] = 1
    return buf.getvalue()


def write_shard(path: str | Path, kind: str, arrays: Mapping[str, Any], *, producer: Mapping[str, Any],
                dataset: Mapping[str, Any], shard_index: int, num_shards: int) -> Path:
    """Write one shard atomically: built in memory, written to a temporary file in the same folder (after
    checking the free space), renamed over ``path``. A full or read-only disk raises one CacheError line."""
    data = shard_bytes(kind, arrays, producer=producer, dataset=dataset, shard_index=shard_index,
                       num_shards=num_shards, path=path)
    return write_bytes_atomic(path, data)


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


class RegionRows:
    """Images' 20-row layouts gathered in order for one region shard: detectors and feature sources fill it alike."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {k: [] for k in ("image_ids", "image_hw", "boxes", "scores", "labels",
                                                         "mask", "features")}

    def __len__(self) -> int:
        return len(self.columns["image_ids"])

    def add(self, image_id: str, height: int, width: int, layout: Mapping[str, np.ndarray],
            features: np.ndarray) -> None:
        """``layout``: boxes, scores, labels, mask of the 20 rows; ``features`` (20, D) already in the shard dtype."""
        c = self.columns
        c["image_ids"].append(image_id)
        c["image_hw"].append((height, width))
        for k in ("boxes", "scores", "labels", "mask"):
            c[k].append(layout[k])
        c["features"].append(features)

    def write(self, path: str | Path, *, feature_dim: int, feature_dtype: str, failed: Mapping[str, str],
              producer, dataset, shard_index: int, num_shards: int) -> Path:
        n, c = len(self), self.columns
        features = np.stack(c["features"]) if n else np.zeros((0, K_FRAGMENTS, feature_dim), feature_dtype)
        return write_region_shard(
            path, image_ids=c["image_ids"], image_hw=np.asarray(c["image_hw"], np.int32).reshape(n, 2),
            boxes=np.asarray(c["boxes"], np.float32).reshape(n, K_FRAGMENTS, 4),
            scores=np.asarray(c["scores"], np.float32).reshape(n, K_FRAGMENTS),
            labels=np.asarray(c["labels"], np.int32).reshape(n, K_FRAGMENTS),
            mask=np.asarray(c["mask"], bool).reshape(n, K_FRAGMENTS), features=features,
            failed_ids=list(failed), failed_reasons=list(failed.values()), producer=producer, dataset=dataset,
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


def damaged(path: str | Path, e: BaseException) -> CacheError:
    return CacheError(f"cache shard {path} cannot be read: damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                      "delete it and rerun the stage-1 task that writes it (a rerun recomputes only missing shards; "
                      "`python -m pipeline.verify CACHE_FOLDER` lists every damaged one)")


@contextlib.contextmanager
def open_shard(path: str | Path, kind: str, producer: Mapping[str, Any] | None = None,
               dataset: Mapping[str, Any] | None = None) -> Iterator[h5py.File]:
    """Open a finished shard read-only after checking kind, schema and (when given) producer and dataset.

    Datasets are read lazily: ``f["features"][i]`` reads one image's block, not the file. A read that fails in
    the body (a checksum mismatch, a damaged chunk) becomes a CacheError naming the shard and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache shard {path} does not exist: run the stage-1 task that writes it")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise damaged(path, e) from None
    try:
        info = shard_info(f)
        if int(f.attrs.get("complete", 0)) != 1:
            raise CacheError(f"cache shard {path} is incomplete (no completion record): delete it and rerun the "
                             "stage-1 task that writes it")
        check_shard(info, kind, producer, dataset)
        yield f
    except OSError as e:
        raise damaged(path, e) from None
    finally:
        f.close()


def read_strings(dset: h5py.Dataset, sel: Any = slice(None)) -> list[str]:
    """A string column of a shard (its bytes and ``<name>_offsets``), decoded; ``sel`` picks rows."""
    offsets = dset.file[f"{dset.name}_offsets"][()]
    flat = dset[()] if len(dset.shape) and dset.shape[0] else np.zeros(0, np.uint8)
    out = decode_strings(flat, offsets)
    return out if sel == slice(None) else list(np.asarray(out, dtype=object)[sel])


def shard_complete(path: str | Path) -> bool:
    """Whether ``path`` is a whole, finished shard: it opens (HDF5 compares the file's size with the end of file
    recorded at write, so a truncated file fails here) and carries the ``complete`` attribute written last.
    Checksums are not read here (that is ``pipeline.verify``): this is what a task's ``complete()`` asks."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            ok = int(f.attrs.get("complete", 0)) == 1 and int(f.attrs.get("schema_version", 0)) == SCHEMA_VERSION
    except (OSError, ValueError, TypeError) as e:
        log.warning("cache shard %s is damaged (%s): it will be recomputed", path, str(e).splitlines()[0])
        return False
    if not ok:
        log.warning("cache shard %s is incomplete or of an older schema: it will be recomputed", path)
    return ok


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


_DESCRIPTIONS: dict[Path, str] = {}  # folder -> its cache.json text, written when work starts there


def cache_folder(cache_dir: str | Path, kind: str, dataset_name: str, content: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<kind>/<dataset>-<key>``: a new configuration writes beside the old one, never into it.

    ``content`` must hold everything that changes the shards (producer, dataset identity, shard size).
    Naming the folder writes nothing (scheduling and preflight only ask); the first shard written there (or
    ``describe_folder``) adds a ``cache.json`` describing that content, for people browsing the cache.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(dataset_name).stem) or "dataset"
    folder = Path(cache_dir) / kind / f"{safe}-{cache_key(content)}"
    _DESCRIPTIONS[folder.absolute()] = json.dumps(content, indent=2, sort_keys=True, default=str) + "\n"
    return folder


def describe_folder(folder: str | Path) -> None:
    """Write the folder's ``cache.json`` once, when work starts in it (a folder named by ``cache_folder``)."""
    folder = Path(folder)
    text = _DESCRIPTIONS.get(folder.absolute())
    if text is not None and not (folder / "cache.json").exists():
        write_text_atomic(folder / "cache.json", text)
