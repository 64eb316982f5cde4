"""Two Python hot spots of a Stanza bulk parse, done faster with identical results: tag strings, padded batches.

**Tag strings and character ids.**
After every batch Stanza's tagger turns its predicted ids back into strings word by word with
``CompositeVocab.id2unit``; for the morphological features that is a loop over every feature key with a
``"{}={}".format`` per feature, for every word: about a tenth of a bulk parse of captions, in Python. The strings
depend only on the ids, and captions use few distinct combinations, so ``remember_tag_strings`` gives the tagger's
composite vocabularies (XPOS, UFeats) an ``unmap`` that builds each string once and returns the same string after.
The same holds the other way for characters: both data loaders map every word to character ids one character at a
time, and captions repeat their words, so each word's ids are looked up once.
Like ``pipeline.treedecode.use_batched_decoder`` it sets instance attributes of one Pipeline's vocabularies:
Stanza's classes, and every other Pipeline, are untouched.

**Padded batches.** Stanza's data loaders turn each batch's nested id lists into a padded LongTensor with
``stanza.models.common.data.get_long_tensor``, one small tensor per sentence or word: about a tenth of a bulk parse.
``padded_long_tensor`` builds the same tensor with numpy in one step for the two-level lists (sentences x words,
words x characters) and calls Stanza's function for anything else; ``fast_batches`` puts it in place of the pos
and depparse loaders' name only while a ``with`` block runs (the parse of a group of captions), then restores it.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator

import numpy as np
import torch

MAX_REMEMBERED = 200_000  # distinct id combinations per vocabulary; past it, new ones are built each time


def remembering_unmap(id2unit: Callable[[Any], Any]) -> Callable[[list], list]:
    """``unmap`` (ids -> strings) over ``id2unit``, remembering each combination's string."""
    seen: dict[Any, Any] = {}

    def unmap(ids: list) -> list:
        out = []
        for x in ids:
            key = tuple(x) if isinstance(x, list) else x
            unit = seen.get(key)
            if unit is None:
                unit = id2unit(x)
                if len(seen) < MAX_REMEMBERED:
                    seen[key] = unit
            out.append(unit)
        return out

    return unmap


def remembering_map(map_: Callable[[list], list]) -> Callable[[list], list]:
    """``map`` (a word's characters -> ids) over ``map_``, remembering each word's ids; every call gets its own list."""
    seen: dict[tuple, list] = {}

    def map_chars(units: list) -> list:
        key = tuple(units)
        ids = seen.get(key)
        if ids is None:
            ids = map_(units)
            if len(seen) < MAX_REMEMBERED:
                seen[key] = ids
        return list(ids)

    return map_chars


def _vocabs(nlp: Any, processor: str) -> dict:
    proc = nlp.processors.get(processor)
    return getattr(getattr(getattr(proc, "trainer", None), "vocab", None), "_vocabs", {}) or {}


def remember_tag_strings(nlp: Any, on: bool = True) -> int:
    """Give this Pipeline's tagger vocabularies that build strings (CompositeVocab with a separator) a remembering
    ``unmap``, and the tagger's and parser's character vocabularies a remembering ``map`` (a word's characters to
    ids, looked up one character at a time by Stanza); ``on=False`` restores Stanza's own. Returns how many
    vocabularies it applies to."""
    from stanza.models.common.vocab import CharVocab, CompositeVocab

    n = 0
    for vocab in _vocabs(nlp, "pos").values():
        if not isinstance(vocab, CompositeVocab) or getattr(vocab, "sep", None) is None:
            continue  # no separator: id2unit returns a fresh list, which callers may change
        if on:
            vocab.unmap = remembering_unmap(vocab.id2unit)
        else:
            vocab.__dict__.pop("unmap", None)
        n += 1
    for processor in ("pos", "depparse"):
        vocab = _vocabs(nlp, processor).get("char")
        if type(vocab) is CharVocab:  # exactly Stanza's: its ids depend on the characters only
            if on:
                vocab.__dict__.pop("map", None)
                vocab.map = remembering_map(vocab.map)
            else:
                vocab.__dict__.pop("map", None)
            n += 1
    return n


def padded_long_tensor(tokens_list: list, batch_size: int, pad_id: int = 0,
                       fallback: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Stanza's ``get_long_tensor`` (lists of id lists -> (batch_size, longest) int64, padded with ``pad_id``),
    vectorised for two-level lists of ints; deeper or unusual input goes to ``fallback`` (Stanza's own)."""
    if fallback is None:
        from stanza.models.common.data import get_long_tensor as fallback
    first = tokens_list[0] if tokens_list else None
    if not (isinstance(first, list) and first and not isinstance(first[0], list)):
        return fallback(tokens_list, batch_size, pad_id)
    try:
        lens = np.fromiter(map(len, tokens_list), np.int64, count=len(tokens_list))
        flat = np.fromiter(itertools.chain.from_iterable(tokens_list), np.int64, count=int(lens.sum()))
    except (TypeError, ValueError):  # a nested list, or a non-integer id: Stanza's function decides
        return fallback(tokens_list, batch_size, pad_id)
    out = np.full((batch_size, int(lens.max())), pad_id, np.int64)
    out[: len(lens)][np.arange(out.shape[1])[None, :] < lens[:, None]] = flat  # row-major: each list in order
    return torch.from_numpy(out)


@contextlib.contextmanager
def fast_batches() -> Iterator[None]:
    """Inside the block, Stanza's pos and depparse data loaders pad their batches with ``padded_long_tensor``."""
    import stanza.models.common.data as common
    import stanza.models.depparse.data as dep
    import stanza.models.pos.data as pos

    original = common.get_long_tensor
    mods = [m for m in (pos, dep) if getattr(m, "get_long_tensor", None) is original]

    def fast(tokens_list, batch_size, pad_id=0):
        return padded_long_tensor(tokens_list, batch_size, pad_id, original)

    for m in mods:
        m.get_long_tensor = fast
    try:
        yield
    finally:
        for m in mods:
            m.get_long_tensor = original
