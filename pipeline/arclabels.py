"""Relation labels scored on the decoded arcs only, giving exactly Stanza's labels.

Stanza's graph parser scores every relation for every (dependent, head) pair of a batch: its deep biaffine
relation scorer builds a (B, T, hidden, R) intermediate and a (B, T, T, R) score tensor, takes a log-softmax over
all of it and copies both to numpy, and then reads only the T arcs of each decoded tree. The arcs do not depend
on the relation scores, so ``predict`` (an instance-attribute drop-in for ``GraphParser.predict``) runs Stanza's
own network up to the arc scores, decodes every tree (``pipeline.treedecode.mst_heads``) and scores the
relations of the chosen arcs only, with the scorer's own weights:

    score[w, r] = a_w^T W[:, :, r] b_w + bias[r],  a_w = [relu(W1 x_dep); 1],  b_w = [relu(W2 x_head); 1]

That is Stanza's bilinear form summed in another order, so a score can differ from Stanza's in its last bits.
A label is taken from these scores only where its lead over the runner-up is larger than any such difference
can be (the dot-product rounding bound, ``rounding_bound``); every other sentence, and every sentence Stanza's
head-constraint repair needs, is scored again by Stanza's own scorer on that sentence alone (bit for bit its
batched output on the CPU, where the scorer's products are per sentence; on a GPU the whole batch once), so
every label, tree and repair is Stanza's. ``use_arc_labels`` installs it on one Pipeline's parser.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .treedecode import _label_groups, assemble, mst_heads, violations

UNIT_ROUNDOFF = 2.0 ** -24  # float32
CHUNK_WORDS = 512  # arcs scored per product: a (512, J x R) float32 intermediate (10 MB at J 101, R 49)


class _Capture(nn.Module):
    """Stands in for the relation scorer inside ``forward_scores``: keeps its inputs, computes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: tuple[Tensor, Tensor] | None = None

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        self.inputs = (input1, input2)
        return input1  # forward_scores hands the relation scores back untouched; predict ignores this


def hidden_pair(scorer: nn.Module, input1: Tensor, input2: Tensor) -> tuple[Tensor, Tensor]:
    """The deep biaffine scorer's two sides as its own forward builds them: [relu(W1 x); 1], [relu(W2 x); 1]."""
    a = scorer.dropout(scorer.hidden_func(scorer.W1(input1)))
    b = scorer.dropout(scorer.hidden_func(scorer.W2(input2)))
    return (torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1), torch.cat([b, b.new_ones(*b.shape[:-1], 1)], -1))


def arc_scores(a: Tensor, b: Tensor, weight: Tensor, bias: Tensor, chunk: int = CHUNK_WORDS) -> Tensor:
    """Bilinear scores (n, R) of n arcs: a (n, I) dependents, b (n, J) their heads, weight (I, J, R), bias (R,)."""
    n, (I, J, R) = a.shape[0], weight.shape
    W = weight.reshape(I, J * R)
    out = a.new_empty((n, R))
    for s in range(0, n, chunk):
        inter = (a[s:s + chunk] @ W).view(-1, J, R)  # (c, J, R): a^T W for each arc
        out[s:s + chunk] = torch.bmm(b[s:s + chunk, None, :], inter)[:, 0]  # (c, R)
    return out + bias


def rounding_bound(a: Tensor, b: Tensor, abs_weight_norm: Tensor) -> Tensor:
    """(n, R) bound on |our score - Stanza's score|: both sum the same I x J products, in different orders.

    Any order of an n-term float sum errs by at most gamma_n = n u / (1 - n u) times the sum of the terms'
    magnitudes, here sum_ij |a_i| |W_ijr| |b_j| <= ||a|| ||b|| sigma(|W_r|) (``abs_weight_norm``: the spectral norm of
    each |W_r|); two computations, so twice that, plus the bias addition's rounding.
    """
    I, J = a.shape[1], b.shape[1]
    k = (I + J + 2) * UNIT_ROUNDOFF
    gamma = 2 * k / (1 - k)
    return gamma * (a.norm(dim=1) * b.norm(dim=1))[:, None] * abs_weight_norm[None, :]


def settled(values: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """Best label of each row and whether it is certain: its lead over every other label exceeds both values'
    error bounds (x4 for the log-softmax's own rounding, which shifts a row by a common amount), plus a margin of
    a few ulps of the values (so rounding cannot make a tie)."""
    top = values.argmax(-1)  # (n,)
    best = values.gather(1, top[:, None])  # (n, 1)
    lead = best - values  # (n, R), 0 at top
    err = 4 * (bound + bound.gather(1, top[:, None])) + 8 * torch.finfo(values.dtype).eps * best.abs().clamp_min(1)
    lead.scatter_(1, top[:, None], float("inf"))
    return top, (lead > err).all(-1)


_NORMS: dict[int, tuple[Tensor, Tensor, int]] = {}
# running totals, read by benchmarks/bench_parse.py: arcs scored here, sentences rescored by Stanza's scorer
# (a near tie), sentences sent to Stanza's head-constraint repair
counts = {"arcs": 0, "rescored": 0, "repaired": 0}


def abs_weight_norms(weight: Tensor) -> Tensor:
    """Spectral norm of each |W_r| (R,) of a (I, J, R) weight, rounded up; computed once per weight tensor."""
    key = id(weight)
    if key not in _NORMS or _NORMS[key][0] is not weight or _NORMS[key][0]._version != _NORMS[key][2]:
        w = weight.detach().abs().double().permute(2, 0, 1)  # (R, I, J)
        norms = (torch.linalg.matrix_norm(w, ord=2) * (1 + 1e-6)).to(weight.dtype)
        _NORMS[key] = (weight, norms, weight._version)
    return _NORMS[key][1]


def _stanza_labels(full: Tensor, heads: np.ndarray, resolve_head_constraints: bool) -> np.ndarray:
    """Stanza's raw label of each word of one sentence from its own scores full (T0, T0, R): the argmax of the
    log-softmax in numpy (resolve mode) or torch's max of the scores, read on the tree's arcs."""
    l = len(heads)
    if resolve_head_constraints:
        logp = F.log_softmax(full, 2).detach().cpu().numpy()
        return logp[np.arange(1, l), heads[1:]].argmax(-1)
    return full.max(2)[1].cpu().numpy()[np.arange(1, l), heads[1:]]


@torch.no_grad()
def predict(model: Any, word, word_mask, wordchars, wordchars_mask, upos, xpos, ufeats, pretrained, lemma, head,
            deprel, word_orig_idx, sentlens, wordlens, text, resolve_head_constraints: bool = False):
    """``GraphParser.predict`` with relations scored on the decoded arcs only; the same output as Stanza's."""
    from stanza.models.common.vocab import VOCAB_PREFIX_SIZE

    scorer = model.deprel
    capture = _Capture()
    model._modules["deprel"] = capture
    try:
        unlabeled = model.forward_scores(word, word_mask, wordchars, wordchars_mask, upos, xpos, ufeats, pretrained,
                                         lemma, head, deprel, word_orig_idx, sentlens, wordlens, text)[0]
    finally:
        model._modules["deprel"] = scorer
    input1, input2 = capture.inputs  # (B, T0, H): what Stanza's scorer would get
    arc_logp = F.log_softmax(unlabeled, 2).detach().cpu().numpy()  # Stanza's preds[0]
    vocab, bilinear = model.vocab["deprel"], scorer.scorer.W_bilin
    lens = np.asarray(sentlens, dtype=np.int64)
    heads = mst_heads(arc_logp, lens)  # (B, T): Stanza's trees
    B, T = heads.shape
    is_word = np.arange(1, T)[None, :] < lens[:, None]  # (B, T-1); word w sits at position w + 1
    bi, wj = np.nonzero(is_word)

    a, b = hidden_pair(scorer, input1, input2)  # (B, T0, I), (B, T0, J)
    ti, tw, th = (torch.from_numpy(x).to(a.device) for x in (bi, wj + 1, heads[bi, wj + 1]))
    a_w, b_w = a[ti, tw], b[ti, th]  # (n, I), (n, J): each word and its head
    scores = arc_scores(a_w, b_w, bilinear.weight, bilinear.bias)  # (n, R)
    values = F.log_softmax(scores, -1) if resolve_head_constraints else scores
    top, sure = settled(values, rounding_bound(a_w, b_w, abs_weight_norms(bilinear.weight)))
    raw = np.zeros((B, T - 1), dtype=np.int64)  # raw relation id (no vocabulary prefix) of each word
    raw[bi, wj] = top.cpu().numpy()

    full: dict[int, Tensor] = {}  # sentence -> Stanza's own (T0, T0, R) relation scores for it

    def own(i: int) -> Tensor:
        if i not in full:
            if a.device.type == "cpu":  # the CPU's products are per sentence: one sentence is its batched output
                full[i] = scorer(input1[i:i + 1], input2[i:i + 1])[0]
            else:  # a GPU library may pick other kernels for another batch size: Stanza's whole call, once
                full.setdefault(-1, scorer(input1, input2))
                full[i] = full[-1][i]
        return full[i]

    unsure = np.unique(bi[~sure.cpu().numpy()]).tolist()
    for i in unsure:  # a near tie: Stanza's scorer decides
        raw[i, : lens[i] - 1] = _stanza_labels(own(i), heads[i, : lens[i]], resolve_head_constraints)
    violated: set[int] = set()
    if resolve_head_constraints:
        violated = violations(raw, _label_groups(vocab, bilinear.weight.shape[-1]), heads, is_word)
    counts["arcs"] += len(bi)
    counts["rescored"] += len(unsure)
    counts["repaired"] += len(violated)
    out = assemble(vocab, lens, heads, raw + VOCAB_PREFIX_SIZE, violated, arc_logp,
                   lambda i: F.log_softmax(own(i), 2).cpu().numpy())
    return out[: word.size(0)]


def applies(model: Any) -> bool:
    """Whether ``predict`` fits this parser: Stanza's graph parser with a pairwise deep biaffine relation scorer."""
    from stanza.models.common.biaffine import DeepBiaffineScorer, PairwiseBiaffineScorer
    from stanza.models.depparse.model import GraphParser

    return (type(model) is GraphParser and not model.args.get("use_arc_embedding")
            and isinstance(getattr(model, "deprel", None), DeepBiaffineScorer)
            and isinstance(model.deprel.scorer, PairwiseBiaffineScorer))


def use_arc_labels(nlp: Any, on: bool = True) -> bool:
    """Score this Pipeline's relations on the decoded arcs only (``on=False`` restores Stanza's ``predict``).

    An instance attribute of this Pipeline's parser: Stanza's class and every other Pipeline are untouched.
    Returns whether the parser is one this applies to; other parsers are left alone.
    """
    proc = nlp.processors.get("depparse")
    model = getattr(getattr(proc, "trainer", None), "model", None)
    if model is None or not applies(model):
        return False
    if on:
        model.predict = functools.partial(predict, model)
    else:
        model.__dict__.pop("predict", None)
    return True
