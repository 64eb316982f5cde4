"""The vocabulary: word and relation counts over the training captions' triples, as JSON.

A later, cheap step over the parse cache (which holds strings and never changes when the vocabulary does).
No Stanza here: model/ imports this module.

vocab.json:
    {"words": [...], "word_counts": [...], "relations": [...], "relation_counts": [...],
     "unk": "<unk>", "min_count": 5, "source": {...}}
``words[0]`` and ``relations[0]`` are "<unk>"; its count is the total count of everything mapped to it.
Words: the head and dependent words of the triples (lowercased by the parser), one count per word occurrence in a
caption (a word heading three triples counts once); kept when seen at least ``min_count`` times.
Relations: every relation seen in training (no minimum). Order: count descending, then the string: deterministic.

With word vectors (BuildVocab --word-vectors) the vectors define the words instead: every caption word of the
dataset (any split) that has a vector, counts still from training, and a ``vectors`` entry naming the source
(sha256, dim); the rows themselves sit beside vocab.json in vectors.npy (model/wordvecs.py writes both).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .cache import CacheError, cache_folder, cache_key, list_shards, read_triple_shard, write_text_atomic

UNK = "<unk>"
VECTORS_FILE = "vectors.npy"  # a vocabulary of word vectors: its rows, beside vocab.json
DEFAULT_MIN_COUNT = 5


@dataclass
class Vocab:
    words: list[str]
    word_counts: list[int]
    relations: list[str]
    relation_counts: list[int]
    min_count: int = DEFAULT_MIN_COUNT
    unk: str = UNK
    source: dict = field(default_factory=dict)
    vectors: dict | None = None  # the word vector source (source, format, sha256, dim, words) when it defines the words
    vector_rows: Any = field(default=None, repr=False, compare=False)  # (n_words, dim) float32, row 0 <unk>

    @cached_property
    def _word_ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    @cached_property
    def _rel_ids(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.relations)}

    def word_id(self, word: str) -> int:
        """Index of a word, 0 ("<unk>") when it is not in the vocabulary."""
        return self._word_ids.get(word, 0)

    def rel_id(self, rel: str) -> int:
        return self._rel_ids.get(rel, 0)

    def to_json(self) -> dict[str, Any]:
        out = {"words": self.words, "word_counts": self.word_counts, "relations": self.relations,
               "relation_counts": self.relation_counts, "unk": self.unk, "min_count": self.min_count,
               "source": self.source}
        if self.vectors is not None:
            out["vectors"] = self.vectors
        return out

    @cached_property
    def key(self) -> str:
        """A short hash of the content: checkpoints record it and refuse another vocabulary."""
        return cache_key(self.to_json())


def _ordered(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def build_vocab(word_counts: Counter, rel_counts: Counter, min_count: int = DEFAULT_MIN_COUNT,
                source: Mapping[str, Any] | None = None) -> Vocab:
    """Vocabulary from counts (pure): words under ``min_count`` fold into "<unk>"."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    kept = [(w, c) for w, c in _ordered(word_counts) if c >= min_count and w != UNK]
    unk_count = sum(c for w, c in word_counts.items() if c < min_count or w == UNK)
    rels = [(r, c) for r, c in _ordered(rel_counts) if r != UNK]
    return Vocab(words=[UNK] + [w for w, _ in kept], word_counts=[unk_count] + [c for _, c in kept],
                 relations=[UNK] + [r for r, _ in rels],
                 relation_counts=[rel_counts.get(UNK, 0)] + [c for _, c in rels],
                 min_count=min_count, source=dict(source or {}))


def vocab_from_vectors(word_counts: Counter, rel_counts: Counter, vector_words: Sequence[str],
                       vectors: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> Vocab:
    """Vocabulary whose words are ``vector_words`` (pure): ``<unk>`` first, then by training count descending,
    then the string; ``word_counts`` (training) of words without a vector fold into ``<unk>``."""
    have = set(vector_words) - {UNK}
    words = sorted(have, key=lambda w: (-word_counts.get(w, 0), w))
    base = build_vocab(Counter(), rel_counts, 1, source)
    return Vocab(words=[UNK] + words, word_counts=[sum(c for w, c in word_counts.items() if w not in have)]
                 + [word_counts.get(w, 0) for w in words], relations=base.relations,
                 relation_counts=base.relation_counts, min_count=1, source=base.source, vectors=dict(vectors))


def count_shards(shards: Iterable[str | Path], caption_ids: set[str] | None, producer=None,
                 dataset=None) -> tuple[Counter, Counter, int]:
    """(word counts, relation counts, captions counted) over triple shards, only ``caption_ids`` when given."""
    words: Counter = Counter()
    rels: Counter = Counter()
    n = 0
    for path in shards:
        block = read_triple_shard(path, producer, dataset)
        for m, cid in enumerate(block.caption_ids):
            if caption_ids is not None and cid not in caption_ids:
                continue
            n += 1
            a, b = int(block.offsets[m]), int(block.offsets[m + 1])
            rels.update(block.rel[a:b])
            occurrences = {}  # position -> word: each word of the caption counted once
            for i in range(a, b):
                occurrences[int(block.head_pos[i])] = block.head[i]
                occurrences[int(block.dep_pos[i])] = block.dep[i]
            occurrences.pop(0, None)  # the artificial root (only when root triples are kept)
            words.update(occurrences.values())
    return words, rels, n


def count_training(triple_folder: str | Path, train_caption_ids: set[str], producer=None,
                   dataset=None) -> tuple[Counter, Counter, int, list[Path]]:
    """(word counts, relation counts, captions counted) of the training captions of a finished triple cache
    folder, and its shards."""
    shards = list_shards(triple_folder)
    if not shards:
        raise CacheError(f"triple cache {triple_folder} has no finished shards: run ParseSentences first")
    words, rels, n = count_shards(shards, train_caption_ids, producer, dataset)
    if n == 0:
        raise CacheError(f"triple cache {triple_folder} holds none of the {len(train_caption_ids)} training "
                         "captions: the vocabulary is built from the training split only, so it needs training "
                         "captions (check the dataset's splits)")
    return words, rels, n, shards


def vocab_from_cache(triple_folder: str | Path, train_caption_ids: set[str], min_count: int = DEFAULT_MIN_COUNT,
                     source: Mapping[str, Any] | None = None, producer=None, dataset=None) -> Vocab:
    """Count the training captions of a finished triple cache folder into a Vocab."""
    words, rels, n, _ = count_training(triple_folder, train_caption_ids, producer, dataset)
    return build_vocab(words, rels, min_count, {**(source or {}), "train_captions": n})


def save_vocab(vocab: Vocab, path: str | Path) -> Path:
    """Write vocab.json atomically (temporary file in the same folder, then rename); a vocabulary of word
    vectors writes its rows first (vectors.npy beside it), so a finished vocab.json always has them."""
    if vocab.vector_rows is not None:
        save_vector_rows(vocab.vector_rows, Path(path).with_name(VECTORS_FILE))
    return write_text_atomic(path, json.dumps(vocab.to_json(), indent=1, ensure_ascii=False) + "\n")


def save_vector_rows(table: np.ndarray, path: Path) -> Path:
    """vectors.npy through a temporary name and a rename (a kill never leaves half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    try:
        np.save(tmp, np.ascontiguousarray(table, np.float32))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_vector_rows(vocab_file: str | Path, n_words: int, dim: int) -> np.ndarray:
    """The rows of a vocabulary of word vectors (vectors.npy beside vocab.json), checked against it."""
    path = Path(vocab_file).with_name(VECTORS_FILE)
    try:
        table = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} (the vocabulary's word vectors) cannot be read ({e}): delete "
                         f"{Path(vocab_file).name} and rerun BuildVocab") from None
    if table.shape != (n_words, dim):
        raise ValueError(f"{path} holds {table.shape}, the vocabulary {vocab_file} needs ({n_words}, {dim}): "
                         "delete both and rerun BuildVocab")
    return table


def load_vocab(path: str | Path) -> Vocab:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary {path} does not exist: run BuildVocab first") from None
    except ValueError as e:
        raise ValueError(f"vocabulary {path} is not valid JSON ({e}): delete it and rerun BuildVocab") from None
    try:
        v = Vocab(words=list(d["words"]), word_counts=[int(c) for c in d["word_counts"]],
                  relations=list(d["relations"]), relation_counts=[int(c) for c in d["relation_counts"]],
                  min_count=int(d["min_count"]), unk=d["unk"], source=dict(d.get("source", {})),
                  vectors=dict(d["vectors"]) if d.get("vectors") is not None else None)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"vocabulary {path} lacks or has a bad field ({e!r}): delete it and rerun BuildVocab") \
            from None
    if (len(v.words) != len(v.word_counts) or len(v.relations) != len(v.relation_counts)
            or v.words[:1] != [v.unk] or v.relations[:1] != [v.unk]
            or len(set(v.words)) != len(v.words) or len(set(v.relations)) != len(v.relations)):
        raise ValueError(f"vocabulary {path} is inconsistent (lengths, duplicates, or {v.unk!r} not first): "
                         "delete it and rerun BuildVocab")
    if v.vectors is not None:
        v.vector_rows = load_vector_rows(path, len(v.words), int(v.vectors["dim"]))
    return v


def vocab_path(cache_dir: str | Path, dataset_name: str, triple_folder: str | Path,
               min_count: int = DEFAULT_MIN_COUNT, vectors: Mapping[str, Any] | None = None) -> Path:
    """``<cache_dir>/vocab/<dataset>-<key>/vocab.json``, the key a hash of the triple cache and the settings
    (with word vectors: their sha256 and dimension instead of the minimum count)."""

    content = {"triples": Path(triple_folder).name, "split": "train", "min_count": min_count, "counting": "v1"}
    if vectors:
        content = {"triples": Path(triple_folder).name, "counting": "v1", "dictionary": "vectors",
                   "sha256": vectors["sha256"], "dim": vectors["dim"]}
    return cache_folder(cache_dir, "vocab", dataset_name, content) / "vocab.json"
