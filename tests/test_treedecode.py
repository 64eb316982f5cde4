"""The batched tree decoder gives exactly Stanza's trees: crafted score matrices (ties, -inf, mixed lengths) and the
whole UD English EWT test set parsed both ways through the real Stanza pipeline with the small models."""
from pathlib import Path

import numpy as np
import pytest
import stanza
from stanza.models.common.chuliu_edmonds import chuliu_edmonds_one_root
from stanza.models.depparse.model import GraphParser
from stanza.models.common.vocab import VOCAB_PREFIX_SIZE
from stanza.utils.conll import CoNLL

from pipeline.arclabels import use_arc_labels
from pipeline.treedecode import decode_graph_predictions, mst_heads, pairwise_sum, use_batched_decoder

EWT_TEST = Path(__file__).resolve().parent / "data" / "ud_english_ewt" / "en_ewt-ud-test.conllu"


def assert_same_trees(scores, lengths):
    """Same trees; or, where Stanza refuses a sentence (its one-root assertion), the batch is refused too."""
    try:
        wanted = [chuliu_edmonds_one_root(scores[b, :l, :l]) for b, l in enumerate(lengths)]
    except AssertionError:
        with pytest.raises(AssertionError, match="multiple root edges"):
            mst_heads(scores, lengths)
        return False
    got = mst_heads(scores, lengths)
    for b, (l, want) in enumerate(zip(lengths, wanted)):
        assert got[b, :l].tolist() == want.tolist(), f"sentence {b} (length {l}): {got[b, :l]} != {want}"
    return True


def test_cycle_totals_are_numpys_sums_bit_for_bit():
    rng = np.random.default_rng(0)
    for C in (1, 7, 8, 9, 15, 16, 17, 64, 127, 128, 129, 200):
        n = rng.integers(1, C + 1, 64)
        x = rng.standard_normal((64, C)) * 10.0 ** rng.integers(-12, 12, (64, C))  # order changes the rounding
        x = np.where(np.arange(C)[None, :] < n[:, None], x, 0.0)
        want = np.array([x[b, : n[b]].sum() for b in range(64)])
        assert (pairwise_sum(x, n) == want).all(), C


@pytest.mark.parametrize("kind", ["normal", "ties", "log-probs", "-inf"])
def test_same_trees_as_stanza_on_crafted_batches(kind):
    rng = np.random.default_rng({"normal": 1, "ties": 2, "log-probs": 3, "-inf": 4}[kind])
    decoded = 0
    for _ in range(12):
        B, T = int(rng.integers(1, 16)), int(rng.integers(2, 30))
        lengths = rng.integers(2, T + 1, B)
        lengths[rng.integers(B)] = T
        if kind == "ties":  # a few distinct values: many equal scores, equal cycle totals, equal contractions
            s = rng.integers(-3, 1, (B, T, T)).astype(np.float32)
        else:
            s = rng.standard_normal((B, T, T)).astype(np.float32) * 3
        if kind == "log-probs":  # what the parser gives: row-wise log-softmax, -inf on the diagonal
            s[:, np.arange(T), np.arange(T)] = -np.inf
            s = s - np.log(np.exp(s).sum(-1, keepdims=True))
        if kind == "-inf":  # impossible arcs; a word left with only the root arc can break the one-root rule
            s[rng.random(s.shape) < 0.05] = -np.inf
        decoded += assert_same_trees(s, lengths)
    assert decoded >= 6

def test_all_equal_scores_and_one_word_sentences():
    assert_same_trees(np.zeros((3, 9, 9), np.float32), [9, 2, 5])
    assert_same_trees(np.full((2, 40, 40), -1.5, np.float32), [40, 33])  # a 39-node cycle, one contraction
    assert mst_heads(np.zeros((1, 2, 2), np.float32), [2]).tolist() == [[0, 0]]


@pytest.fixture(scope="module")
def nlp(small_nlp):
    return small_nlp


def test_pipeline_decodes_with_the_batched_decoder_and_can_switch_back(nlp):
    model = nlp.processors["depparse"].trainer.model
    assert "decode_graph_predictions" in vars(model)
    assert use_batched_decoder(nlp, False) and "decode_graph_predictions" not in vars(model)
    assert use_batched_decoder(nlp, True) and "decode_graph_predictions" in vars(model)


def test_ewt_test_set_parses_to_identical_trees_both_ways(nlp):
    """All 2,077 sentences of the EWT test set, from their gold tokens, through the real pipeline: every parser batch
    is decoded both ways from the same network output, and every word's head and relation agree."""
    if not EWT_TEST.exists():
        pytest.skip(f"UD English EWT not found at {EWT_TEST}")
    gold = CoNLL.conll2doc(input_file=str(EWT_TEST))
    texts = [" ".join(w.text for w in s.words) for s in gold.sentences]
    assert len(texts) == 2077
    model = nlp.processors["depparse"].trainer.model
    seen = {"sentences": 0, "words": 0, "differ": []}

    def both(vocab, batch_size, preds, sentlens, resolve_head_constraints=False):
        new = decode_graph_predictions(vocab, batch_size, preds, sentlens, resolve_head_constraints)
        old = GraphParser.decode_graph_predictions(vocab, batch_size, preds, sentlens, resolve_head_constraints)
        seen["sentences"] += len(old)
        seen["words"] += sum(map(len, old))
        seen["differ"] += [(a, b) for a, b in zip(new, old) if a != b]
        return new

    model.decode_graph_predictions = both
    use_arc_labels(nlp, False)  # Stanza's predict, which hands the decoder the full network output
    try:
        docs = nlp.bulk_process([stanza.Document([], text=t) for t in texts])
    finally:
        use_batched_decoder(nlp, True)
        use_arc_labels(nlp, True)
    assert not seen["differ"], f"{len(seen['differ'])} sentences differ, first: {seen['differ'][0]}"
    assert seen["sentences"] == 2077 and seen["words"] == sum(len(s.words) for s in gold.sentences) > 25000
    assert [len(s.words) for d in docs for s in d.sentences] == [len(s.words) for s in gold.sentences]


def test_head_constraint_repairs_match_stanzas(nlp):
    """Relation scores that make two subjects on one head common: those sentences go through Stanza's repair, and
    every sentence comes out as Stanza's decoder gives it."""
    vocab = nlp.processors["depparse"].trainer.model.vocab["deprel"]
    rels = vocab.unmap(list(range(len(vocab))))[VOCAB_PREFIX_SIZE:]
    rng = np.random.default_rng(5)
    B, T, R = 24, 9, len(rels)
    arcs = rng.standard_normal((B, T, T)).astype(np.float32)
    arcs[:, np.arange(T), np.arange(T)] = -np.inf
    arcs = arcs - np.log(np.exp(arcs).sum(-1, keepdims=True))
    labels = rng.standard_normal((B, T, T, R)).astype(np.float32)
    labels[..., rels.index("nsubj")] += 2.5  # the best relation on most arcs
    labels = labels - np.log(np.exp(labels).sum(-1, keepdims=True))
    preds = [arcs, labels.argmax(-1) + VOCAB_PREFIX_SIZE, labels]
    lengths = list(rng.integers(3, T + 1, B))
    want = GraphParser.decode_graph_predictions(vocab, B, preds, lengths, True)
    assert decode_graph_predictions(vocab, B, preds, lengths, True) == want
    assert decode_graph_predictions(vocab, B, preds, lengths, False) == \
        GraphParser.decode_graph_predictions(vocab, B, preds, lengths, False)
    naive = decode_graph_predictions(vocab, B, preds, lengths, False)  # argmax relations, no repair
    assert sum(a != b for a, b in zip(naive, want)) >= 3  # the repair did change sentences here
