"""Initial word vectors from a word2vec or GloVe text file (``word v1 ... vd`` per line)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def load_word_vectors(path: str | Path, words: Sequence[str], d: int, init: Tensor) -> tuple[Tensor, int]:
    """Rows of ``init`` (n_words, d) replaced by the file's vector of each vocabulary word found in it.

    Accepts GloVe (no header) and word2vec text (a first line ``<count> <dim>``). Lookup is exact first, then
    lowercased. Returns the new matrix and the number of words found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word vector file {path} does not exist: pass a word2vec/GloVe text file")
    index = {w: i for i, w in enumerate(words)}
    lower = {}
    for i, w in enumerate(words):
        lower.setdefault(w.lower(), i)
    out = init.clone()
    found = set()
    with path.open(encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                if int(parts[1]) != d:
                    raise ValueError(f"{path}:1: the file holds {parts[1]}-d vectors, the model uses d={d}: "
                                     f"pass --d {parts[1]} or another file")
                continue  # word2vec header
            if len(parts) != d + 1:
                raise ValueError(f"{path}:{lineno}: expected a word and {d} numbers, got {len(parts) - 1} "
                                 "values (is d right, and is this a word2vec/GloVe text file?)")
            i = index.get(parts[0])
            if i is None:
                i = lower.get(parts[0].lower())
                if i is None or i in found:
                    continue
            try:
                out[i] = torch.tensor([float(v) for v in parts[1:]], dtype=out.dtype)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: a value of word {parts[0]!r} is not a number") from None
            found.add(i)
    log.info("word vectors: %d of %d vocabulary words found in %s", len(found), len(words), path)
    return out, len(found)
