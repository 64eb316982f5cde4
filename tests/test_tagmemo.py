"""pipeline.tagmemo against Stanza's own functions: the same padded tensors, tag strings, character ids and parses."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import stanza
import stanza.models.depparse.data as dep_data
import stanza.models.pos.data as pos_data
import torch
from stanza.models.common.data import get_long_tensor

from data import load_dataset
from pipeline.arclabels import use_arc_labels
from pipeline.parse import ParseSettings, get_pipeline
from pipeline.tagmemo import fast_batches, padded_long_tensor, remember_tag_strings
from pipeline.treedecode import use_batched_decoder

MODELS = Path(__file__).resolve().parent / "stanza_models"
FLICKR = Path(__file__).resolve().parent / "data" / "flickr8k" / "Flickr8k.token.txt"


def _lists(r: random.Random, n: int, depth: int = 2, empty_first: bool = False):
    if depth == 1:
        return [r.randint(0, 60) for _ in range(n)]
    return [_lists(r, r.randint(0 if (i or empty_first) else 1, 9), depth - 1) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_padded_long_tensor_equals_stanzas(seed):
    r = random.Random(seed)
    for _ in range(40):
        n = r.randint(1, 25)
        for tokens, bs in ((_lists(r, n), n), (_lists(r, n), n + r.randint(1, 4))):  # the batch may be larger
            for pad in (0, 3):
                want = get_long_tensor(tokens, bs, pad)
                got = padded_long_tensor(tokens, bs, pad)
                assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want), tokens
    # what the fast path does not take goes to Stanza's function: three levels (a word's feature ids), a first
    # list that is empty
    feats = [[[r.randint(0, 5) for _ in range(4)] for _ in range(r.randint(1, 6))] for _ in range(7)]
    assert torch.equal(padded_long_tensor(feats, 9), get_long_tensor(feats, 9))
    assert torch.equal(padded_long_tensor([[], [1, 2]], 3), get_long_tensor([[], [1, 2]], 3))


def test_fast_batches_is_in_place_only_inside_its_block():
    assert pos_data.get_long_tensor is get_long_tensor and dep_data.get_long_tensor is get_long_tensor
    with pytest.raises(RuntimeError):
        with fast_batches():
            assert pos_data.get_long_tensor is not get_long_tensor
            assert dep_data.get_long_tensor is not get_long_tensor
            raise RuntimeError("a failing parse")
    assert pos_data.get_long_tensor is get_long_tensor and dep_data.get_long_tensor is get_long_tensor


@pytest.fixture(scope="module")
def nlp():
    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                      device="cpu", batch_size=64)
    return get_pipeline(s, pretokenized=True)


def test_remembered_tag_strings_are_stanzas(nlp):
    vocab = nlp.processors["pos"].trainer.vocab["feats"]
    assert "unmap" in vars(vocab)  # the pipeline's own vocabulary has it; Stanza's class does not
    assert "unmap" not in vars(type(vocab)) or type(vocab).unmap is not vars(vocab)["unmap"]
    r = random.Random(1)
    sizes = [len(v) for v in vocab._id2unit.values()]
    ids = [[r.randrange(s) for s in sizes] for _ in range(300)]
    ids += ids[:100]  # seen before: from memory
    want = [vocab.id2unit(x) for x in ids]
    assert vocab.unmap(ids) == want and vocab.unmap(ids) == want
    chars = [nlp.processors[p].trainer.vocab["char"] for p in ("pos", "depparse")]
    words = [list(w) for w in ("dog", "dogs", "a", "frisbee", "dog", "Dog", "naïve", "dog")]
    for cv in chars:
        assert "map" in vars(cv)
        got = [cv.map(w) for w in words]
        assert got == [type(cv).map(cv, w) for w in words]  # Stanza's own lookup, character by character
        got[0].append(-1)  # a caller that changes its list changes nothing remembered
        assert cv.map(list("dog")) == type(cv).map(cv, list("dog"))
    assert remember_tag_strings(nlp, False) == 3 and "unmap" not in vars(vocab)
    assert all("map" not in vars(cv) for cv in chars)
    assert vocab.unmap(ids) == want
    remember_tag_strings(nlp, True)


def test_captions_parse_identically_with_and_without_the_speedups(nlp):
    """600 real Flickr8k captions through the pipeline: every word's tags, lemma, head and relation are the same
    with the pipeline's speedups (relations on the decoded arcs, the batched decoder, the remembered tag strings,
    the numpy batches) as with Stanza's own code."""
    texts = [" ".join(c.text.split()) for c in load_dataset(FLICKR).captions[:600]]

    def parse(on: bool):
        use_arc_labels(nlp, on)
        use_batched_decoder(nlp, on)
        remember_tag_strings(nlp, on)
        docs = [stanza.Document([], text=t) for t in texts]
        if on:
            with fast_batches():
                return nlp.bulk_process(docs)
        return nlp.bulk_process(docs)

    try:
        fast, plain = parse(True), parse(False)
    finally:
        use_arc_labels(nlp, True)
        use_batched_decoder(nlp, True)
        remember_tag_strings(nlp, True)

    def fields(docs):
        return [(w.text, w.upos, w.xpos, w.feats, w.lemma, w.head, w.deprel) for d in docs for s in d.sentences
                for w in s.words]

    a, b = fields(fast), fields(plain)
    assert len(a) > 6000 and a == b
    assert len({w[3] for w in a}) > 5  # several feature strings, so the memory was used and reused
