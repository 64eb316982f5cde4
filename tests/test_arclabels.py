"""pipeline.arclabels gives exactly Stanza's parses: the whole UD English EWT test set parsed both ways through the
real pipeline, parsers whose weights make near ties and head-constraint repairs common, and the rounding bound
that decides when Stanza's own scorer is asked, against float64."""
from __future__ import annotations

from pathlib import Path

import pytest
import stanza
import torch
from stanza.models.common.biaffine import PairwiseBilinear
from stanza.models.common.vocab import VOCAB_PREFIX_SIZE
from stanza.utils.conll import CoNLL

import pipeline.arclabels as arclabels
from pipeline.arclabels import abs_weight_norms, arc_scores, rounding_bound, settled, use_arc_labels

EWT_TEST = Path(__file__).resolve().parent / "data" / "ud_english_ewt" / "en_ewt-ud-test.conllu"


@pytest.fixture(scope="module")
def nlp(small_nlp):
    return small_nlp


@pytest.fixture(scope="module")
def ewt():
    if not EWT_TEST.exists():
        pytest.skip(f"UD English EWT not found at {EWT_TEST}")
    gold = CoNLL.conll2doc(input_file=str(EWT_TEST))
    return [" ".join(w.text for w in s.words) for s in gold.sentences]


def parse(nlp, texts, on: bool):
    use_arc_labels(nlp, on)
    try:
        docs = nlp.bulk_process([stanza.Document([], text=t) for t in texts])
    finally:
        use_arc_labels(nlp, True)
    return [[(w.head, w.deprel) for w in s.words] for d in docs for s in d.sentences]


def assert_same(nlp, texts):
    arclabels.counts.update(arcs=0, rescored=0, repaired=0)
    new = parse(nlp, texts, True)
    seen = dict(arclabels.counts)
    old = parse(nlp, texts, False)
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(new, old)) if a != b]
    assert len(new) == len(old) == len(texts)
    assert not differ, f"{len(differ)} sentences differ, first (index, ours, Stanza's): {differ[0]}"
    assert seen["arcs"] == sum(map(len, old))
    return seen


def test_pipeline_scores_relations_on_arcs_and_can_switch_back(nlp):
    model = nlp.processors["depparse"].trainer.model
    assert "predict" in vars(model)  # get_pipeline installed it
    assert use_arc_labels(nlp, False) and "predict" not in vars(model)
    assert use_arc_labels(nlp, True) and "predict" in vars(model)

    class NoParser:
        processors: dict = {}

    assert not use_arc_labels(NoParser())  # nothing to do


@pytest.fixture(params=[False, True], ids=["argmax", "resolve"])
def mode(nlp, request):
    """Stanza's two ways to label: the argmax relation of each arc (these models' setting), or the repair of
    head-constraint violations (two subjects or objects on one head; Stanza's default)."""
    config = nlp.processors["depparse"].config
    keep = config.get("resolve_head_constraints", None)
    config["resolve_head_constraints"] = request.param
    yield request.param
    if keep is None:
        config.pop("resolve_head_constraints")
    else:
        config["resolve_head_constraints"] = keep


def test_ewt_test_set_parses_to_identical_heads_and_relations(nlp, ewt, mode):
    assert len(ewt) == 2077
    seen = assert_same(nlp, ewt if not mode else ewt[:400])  # the whole set in the models' own setting
    assert seen["arcs"] > (25000 if not mode else 4000)


@pytest.fixture
def reweighted(nlp):
    """The parser's relation scorer, to be changed in place by a test; restored afterwards."""
    bilinear = nlp.processors["depparse"].trainer.model.deprel.scorer.W_bilin
    keep = (bilinear.weight.detach().clone(), bilinear.bias.detach().clone())
    yield bilinear
    with torch.no_grad():
        bilinear.weight.copy_(keep[0])
        bilinear.bias.copy_(keep[1])


def _rel(nlp, name):
    return nlp.processors["depparse"].trainer.model.vocab["deprel"].unit2id(name) - VOCAB_PREFIX_SIZE


def test_near_ties_go_to_stanzas_scorer(nlp, ewt, reweighted, mode):
    """Two relations a rounding error apart on every arc: the order of summation decides many of them, so only
    Stanza's own scorer can give Stanza's label there."""
    r1, r2 = _rel(nlp, "det"), _rel(nlp, "amod")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = reweighted.weight
        w[:, :, r2] = w[:, :, r1] * (1 + 2.0 ** -22 * torch.randn(w.shape[:2], generator=g))
        reweighted.bias[r1] += 30.0
        reweighted.bias[r2] = reweighted.bias[r1]
    seen = assert_same(nlp, ewt[:150])
    assert seen["rescored"] >= 100  # nearly every sentence had a near tie


@pytest.mark.parametrize("mode", [True], ids=["resolve"], indirect=True)
def test_head_constraint_repairs_are_stanzas(nlp, ewt, reweighted, mode):
    """A scorer that calls most arcs nsubj: two subjects on one head everywhere, repaired by Stanza's own code."""
    with torch.no_grad():
        reweighted.bias[_rel(nlp, "nsubj")] += 6.0
    seen = assert_same(nlp, ewt[:120])
    assert seen["repaired"] >= 30


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_rounding_bound_covers_both_orders_of_summation(nlp, scale):
    """Our arc scores and Stanza's pairwise einsum, each against float64, stay within half the bound (the bound
    covers the two together), on the parser's real weights and inputs of every size."""
    bilinear = nlp.processors["depparse"].trainer.model.deprel.scorer.W_bilin
    I, J, R = bilinear.weight.shape
    g = torch.Generator().manual_seed(1)
    n = 3000
    a = torch.relu(torch.randn(n, I - 1, generator=g)) * scale * torch.exp(torch.randn(n, 1, generator=g))
    b = torch.relu(torch.randn(n, J - 1, generator=g)) * torch.exp(torch.randn(n, 1, generator=g))
    a, b = torch.cat([a, torch.ones(n, 1)], 1), torch.cat([b, torch.ones(n, 1)], 1)
    with torch.no_grad():
        ours = arc_scores(a, b, bilinear.weight, bilinear.bias)
        pairwise = PairwiseBilinear(I, J, R)
        pairwise.weight.copy_(bilinear.weight)
        pairwise.bias.copy_(bilinear.bias)
        stanzas = pairwise(a[:, None, :], b[:, None, :])[:, 0, 0]  # Stanza's einsum path, one arc per "sentence"
    exact = torch.einsum("ni,ijr,nj->nr", a.double(), bilinear.weight.detach().double(), b.double()) + \
        bilinear.bias.detach().double()
    half = rounding_bound(a, b, abs_weight_norms(bilinear.weight)).double() / 2
    for got in (ours, stanzas):
        err = (got.double() - exact).abs()
        assert (err <= half).all(), float((err / half).max())


def test_settled_labels_need_a_lead_beyond_the_bound():
    values = torch.tensor([[5.0, 1.0, 4.9999], [2.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    bound = torch.full_like(values, 2e-5)
    top, sure = settled(values, bound)
    assert top.tolist()[2] == 1 and top.tolist()[0] == 0
    assert sure.tolist() == [False, False, True]  # a lead of 1e-4 < 4 x (2e-5 + 2e-5); an exact tie; a clear winner
    _, sure = settled(values, torch.zeros_like(values))
    assert sure.tolist() == [True, False, True]


def test_weight_norms_follow_in_place_changes(reweighted):
    before = abs_weight_norms(reweighted.weight).clone()
    with torch.no_grad():
        reweighted.weight.mul_(2.0)
    assert torch.allclose(abs_weight_norms(reweighted.weight), 2 * before)
