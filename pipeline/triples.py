"""Sentence fragments: typed dependency triples (relation, head word, dependent word) of a parsed caption.

Pure functions over parsed words; they read only the attributes Stanza's ``Word`` has (``id``, ``text``,
``lemma``, ``head``, ``deprel``), so they work on a Stanza ``Document`` from the parser or from gold CoNLL-U
(``stanza.utils.conll.CoNLL.conll2doc``) and never import Stanza themselves.

One triple per word whose relation is not skipped: (deprel, text of its head, its own text), lowercased, with
both lemmas and both 1-based word positions in the caption (positions run on across sentences, should a caption
ever come back as more than one). Skipped by default (``DEFAULT_SKIP_RELATIONS``):
    root   the word attached to the artificial root has no head word (the original DeFrag code skipped it)
    punct  punctuation is no fragment of meaning
A skip entry matches a relation exactly or by its universal part: "nmod" skips "nmod:poss" too.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

DEFAULT_SKIP_RELATIONS: tuple[str, ...] = ("punct", "root")
ROOT_WORD = "<root>"  # the head word of a root triple, used only when "root" is not skipped


class Triple(NamedTuple):
    """One sentence fragment; the field order is the triple shard's column order (pipeline.cache)."""
    rel: str
    head: str
    dep: str
    head_lemma: str
    dep_lemma: str
    head_pos: int  # 1-based word position in the caption, 0 for the root
    dep_pos: int


def parse_skip_relations(spec: str | Iterable[str]) -> tuple[str, ...]:
    """"punct, root" or ["punct", "root"] -> a sorted, lowercased, de-duplicated tuple."""
    items = spec.split(",") if isinstance(spec, str) else spec
    return tuple(sorted({s.strip().lower() for s in items if s and s.strip()}))


def is_skipped(rel: str, skip: Iterable[str]) -> bool:
    rel = rel.lower()
    return rel in skip or rel.split(":", 1)[0] in skip


def _norm(s: str | None) -> str:
    return (s or "").lower()


def sentence_triples(words: Sequence[Any], skip: Iterable[str] = DEFAULT_SKIP_RELATIONS,
                     offset: int = 0) -> list[Triple]:
    """Triples of one parsed sentence; ``offset`` is added to positions (words of earlier sentences).

    Words without a parse (``head`` or ``deprel`` missing) give no triple.
    """
    skip = frozenset(skip)
    by_id = {int(w.id): w for w in words}
    out = []
    for w in words:
        if w.head is None or not w.deprel or is_skipped(w.deprel, skip):
            continue
        head_id = int(w.head)
        if head_id == 0:
            head_text = head_lemma = ROOT_WORD
            head_pos = 0
        else:
            h = by_id[head_id]
            head_text, head_lemma, head_pos = _norm(h.text), _norm(h.lemma or h.text), head_id + offset
        out.append(Triple(w.deprel.lower(), head_text, _norm(w.text), head_lemma, _norm(w.lemma or w.text),
                          head_pos, int(w.id) + offset))
    return out


def document_triples(doc: Any, skip: Iterable[str] = DEFAULT_SKIP_RELATIONS) -> tuple[list[Triple], int]:
    """(triples, number of words) of a parsed caption: a Stanza ``Document`` (one sentence, or several)."""
    skip = frozenset(skip)
    triples: list[Triple] = []
    n = 0
    for sent in doc.sentences:
        triples += sentence_triples(sent.words, skip, offset=n)
        n += len(sent.words)
    return triples, n
