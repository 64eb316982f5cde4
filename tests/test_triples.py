"""Triple extraction on gold parses from the real UD English EWT treebank (no parser model involved)."""
from pathlib import Path

from stanza.utils.conll import CoNLL

from pipeline.triples import (DEFAULT_SKIP_RELATIONS, ROOT_WORD, Triple, document_triples, is_skipped,
                              parse_skip_relations)

EWT_TEST = Path(__file__).resolve().parent / "data" / "ud_english_ewt" / "en_ewt-ud-test.conllu"


def gold_sentence(text: str):
    """The gold Stanza Document of the EWT test sentence with this exact ``# text``."""
    for block in EWT_TEST.read_text(encoding="utf-8").split("\n\n"):
        if f"# text = {text}\n" in block:
            return CoNLL.conll2doc(input_str=block + "\n\n")
    raise AssertionError(f"sentence {text!r} not in {EWT_TEST}")


def test_copula_sentence_hand_checked():
    triples, n = document_triples(gold_sentence("Google is a nice search engine."))
    assert n == 7
    assert triples == [
        Triple("nsubj", "engine", "google", "engine", "google", 6, 1),
        Triple("cop", "engine", "is", "engine", "be", 6, 2),
        Triple("det", "engine", "a", "engine", "a", 6, 3),
        Triple("amod", "engine", "nice", "engine", "nice", 6, 4),
        Triple("compound", "engine", "search", "engine", "search", 6, 5),
    ]  # root (engine) and punct (.) skipped


def test_multiword_token_uses_words_and_their_positions():
    triples, n = document_triples(gold_sentence("I'm staying away from the stock."))
    assert n == 8  # "I'm" is two words
    assert [tuple(t) for t in triples] == [
        ("nsubj", "staying", "i", "stay", "i", 3, 1),
        ("aux", "staying", "'m", "stay", "be", 3, 2),
        ("advmod", "staying", "away", "stay", "away", 3, 4),
        ("case", "stock", "from", "stock", "from", 7, 5),
        ("det", "stock", "the", "stock", "the", 7, 6),
        ("obl", "away", "stock", "away", "stock", 4, 7),
    ]


def test_root_and_punct_kept_when_not_skipped():
    doc = gold_sentence("They own blogger, of course.")
    default = {(t.rel, t.head, t.dep) for t in document_triples(doc)[0]}
    assert default == {("nsubj", "own", "they"), ("obj", "own", "blogger"), ("advmod", "own", "of"),
                       ("fixed", "of", "course")}
    every = document_triples(doc, skip=())[0]
    assert Triple("root", ROOT_WORD, "own", ROOT_WORD, "own", 0, 2) in every
    assert ("punct", "of", ",") in {(t.rel, t.head, t.dep) for t in every}
    assert len(every) == 7  # one triple per word when nothing is skipped


def test_skip_set_matches_subtypes_by_their_universal_part():
    assert parse_skip_relations(" Punct, root,,punct ") == ("punct", "root")
    assert DEFAULT_SKIP_RELATIONS == ("punct", "root")
    assert is_skipped("nmod:poss", {"nmod"}) and is_skipped("NMOD", {"nmod"})
    assert not is_skipped("nmod", {"nmod:poss"}) and is_skipped("nmod:poss", {"nmod:poss"})
    doc = gold_sentence("Google is a nice search engine.")
    rels = {t.rel for t in document_triples(doc, skip=("punct", "root", "det", "compound"))[0]}
    assert rels == {"nsubj", "cop", "amod"}


def test_positions_run_on_across_sentences():
    blocks = [b for b in EWT_TEST.read_text(encoding="utf-8").split("\n\n") if "# text = " in b]
    two = CoNLL.conll2doc(input_str="\n\n".join(blocks[:2]) + "\n\n")
    first = CoNLL.conll2doc(input_str=blocks[0] + "\n\n")
    second = CoNLL.conll2doc(input_str=blocks[1] + "\n\n")
    both, n = document_triples(two)
    t1, n1 = document_triples(first)
    t2, n2 = document_triples(second)
    assert n == n1 + n2
    assert both == t1 + [t._replace(head_pos=t.head_pos + n1 if t.head_pos else 0, dep_pos=t.dep_pos + n1)
                         for t in t2]


def test_every_non_skipped_word_of_200_gold_sentences_gives_one_lowercased_triple():
    blocks = [b for b in EWT_TEST.read_text(encoding="utf-8").split("\n\n") if "# text = " in b][:200]
    doc = CoNLL.conll2doc(input_str="\n\n".join(blocks) + "\n\n")
    for sent in doc.sentences:
        triples, _ = document_triples(type("D", (), {"sentences": [sent]})())
        expected = [w for w in sent.words if w.deprel.split(":")[0] not in ("punct", "root")]
        assert [t.dep_pos for t in triples] == [w.id for w in expected]
        for t, w in zip(triples, expected):
            assert t.rel == w.deprel.lower() and t.dep == w.text.lower()
            assert t.head == sent.words[w.head - 1].text.lower() and t.head_pos == w.head
