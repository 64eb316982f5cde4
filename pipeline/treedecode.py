"""Dependency-tree decoding for a whole parser batch at once, giving exactly Stanza's trees.

Stanza's graph parser decodes each sentence on its own, in Python: ``chuliu_edmonds_one_root`` (the maximum
spanning tree with one root arc, by Chu-Liu-Edmonds: take every word's best head, contract a cycle into one node,
repeat, expand back), then ``resolve_head_constraint_violations`` (a head with two subjects or two objects).
On captions that Python loop is about half of the parse time. ``mst_heads`` runs the same algorithm for every
sentence of a batch together, as numpy array operations, one contraction per step for all sentences at once, and
gives the identical tree, because it repeats Stanza's steps exactly:

  * the same float64 arithmetic in the same order (the root reweighting ``s[:, 0] += min * t``, the contracted
    scores ``(s - cycle arc) + cycle total``, the cycle total summed in numpy's own pairwise order);
  * the same choices: numpy's argmax (first maximum) over nodes in Stanza's order (the nodes outside the
    cycle in their order, then the cycle's node last), and the same cycle contracted first. Stanza's Tarjan search
    lists cycles by their smallest node and contracts the last one listed: the cycle whose smallest node is largest.

``decode_graph_predictions`` is a drop-in for Stanza's ``GraphParser.decode_graph_predictions`` (same arguments,
same output); the rare sentence with a head-constraint violation goes to Stanza's own repair function unchanged.
``use_batched_decoder`` installs it on one Pipeline's parser (an instance attribute: Stanza's class, and every
other Pipeline, are untouched).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

NEG = -np.inf
_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE: below it a sum is eight running sums, above it a recursive split


# ---------------------------------------------------------------------------------------------------- arithmetic

def pairwise_sum(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Row sums of ``x[b, :n[b]]`` (float64, (B, C)) bit for bit equal to numpy's ``x[b, :n[b]].sum()``.

    numpy adds fewer than 8 numbers left to right, up to 128 in eight running sums (then a fixed tree, then the
    tail left to right), and splits longer arrays in two; rows longer than 128 are summed by numpy itself.
    """
    B, C = x.shape
    n = np.asarray(n)
    seq = np.zeros(B)
    for k in range(min(C, 7)):  # n < 8: left to right
        seq = np.where(k < n, seq + x[:, k], seq)
    out = seq
    if C >= 8:
        n8 = n - n % 8
        r = x[:, :8].copy()
        for i in range(8, C - C % 8, 8):
            on = (i < n8)[:, None]
            r = np.where(on, r + x[:, i:i + 8], r)
        res = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
        rows = np.arange(B)
        for t in range(7):  # the tail after the last multiple of 8
            i = n8 + t
            res = np.where(i < n, res + x[rows, np.minimum(i, C - 1)], res)
        out = np.where(n < 8, seq, res)
        for b in np.nonzero(n > _PAIRWISE_BLOCK)[0]:
            out[b] = x[b, : n[b]].sum()
    return out


def _packed(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of each row's True entries in ascending order, padded with 0; and the padding mask."""
    counts = mask.sum(1)
    k = max(int(counts.max()), 1)
    idx = np.argsort(~mask, axis=1, kind="stable")[:, :k]
    valid = np.arange(k)[None, :] < counts[:, None]
    return np.where(valid, idx, 0), valid


def _prepare(A: np.ndarray) -> None:
    """Stanza's ``prepare_scores`` on every matrix: no self loops; the root's row picks the root."""
    d = np.arange(A.shape[1])
    A[:, d, d] = NEG
    A[:, 0, :] = NEG
    A[:, 0, 0] = 0.0


# ---------------------------------------------------------------------------------------------------- decoding

def mst_heads(scores: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Heads (B, T) int64 of the maximum spanning tree with one root arc of each sentence of a padded batch.

    scores: (B, T0, T0) arc scores, ``scores[b, x, y]`` = score of y heading x, node 0 the root; ``lengths[b]``
    counts the root, so sentence b is ``scores[b, :l, :l]``. Row b of the result, cut to ``lengths[b]``, equals
    ``stanza.models.common.chuliu_edmonds.chuliu_edmonds_one_root(scores[b, :l, :l])``.
    """
    L = np.asarray(lengths, dtype=np.int64)
    B, T = len(L), int(L.max())
    A = np.array(scores[:, :T, :T], dtype=np.float64)
    live = np.arange(T)[None, :] < L[:, None]
    block = live[:, :, None] & live[:, None, :]
    # the single-root rule: push every root arc below any other arc (by the sentence's lowest finite score x t)
    lowest = np.where(block & np.isfinite(A), A, np.inf).min(axis=(1, 2))
    A[:, :, 0] += (lowest * L)[:, None]
    A[~block] = NEG

    out = np.zeros((B, T), dtype=np.int64)  # each sentence's tree, in the node space of its deepest contraction
    ids, m = np.arange(B), L.copy()  # sentences still contracting; their live node counts
    levels = []
    while ids.size:
        _prepare(A)
        b, M = A.shape[0], A.shape[1]
        nodes = np.arange(M)
        live = nodes[None, :] < m[:, None]
        heads = np.where(live, A.argmax(axis=2), 0)  # (b, M): every node's best head
        # after >= M pointer doublings every node stands on its cycle; low = the smallest node of its orbit
        jump, low = heads, np.broadcast_to(nodes, (b, M)).copy()
        for _ in range(max(1, (M - 1).bit_length())):
            low = np.minimum(low, np.take_along_axis(low, jump, 1))
            jump = np.take_along_axis(jump, jump, 1)
        on_cycle = np.zeros((b, M), dtype=bool)
        np.put_along_axis(on_cycle, jump, True, 1)
        on_cycle[:, 0] = False  # the root's own loop
        chosen = np.where(on_cycle, low, -1).max(1)  # the cycle Stanza contracts: largest smallest node
        done = chosen < 1
        out[ids[done], :M] = heads[done]
        go = ~done
        if not go.any():
            break
        ids, A, m, heads, chosen, on_cycle, low, live = (x[go] for x in (ids, A, m, heads, chosen, on_cycle, low,
                                                                          live))
        b = len(ids)
        members = on_cycle & (low == chosen[:, None])
        cyc, cmask = _packed(members)  # (b, C) cycle nodes, ascending
        non, nmask = _packed(live & ~members)  # (b, N) the other nodes, ascending
        c, n = cmask.sum(1), nmask.sum(1)
        r1, r2 = np.arange(b)[:, None], np.arange(b)[:, None, None]
        arc = np.where(cmask, A[r1, cyc, heads[r1, cyc]], 0.0)  # (b, C) the cycle's own arcs
        total = pairwise_sum(arc, c)
        # entering the cycle at member k from outside head j: (b, C, N)
        enter = (A[r2, cyc[:, :, None], non[:, None, :]] - arc[:, :, None]) + total[:, None, None]
        enter = np.where(cmask[:, :, None], enter, NEG)
        mheads = enter.argmax(1)  # (b, N)
        mrow = np.take_along_axis(enter, mheads[:, None, :], 1)[:, 0]
        # outside dependent i headed by member k: (b, N, C)
        leave = np.where(cmask[:, None, :], A[r2, non[:, :, None], cyc[:, None, :]], NEG)
        mdeps = leave.argmax(2)
        mcol = np.take_along_axis(leave, mdeps[:, :, None], 2)[:, :, 0]
        # the contracted graph: outside nodes in order, the cycle as node n (its row/column set below)
        N = non.shape[1]
        A2 = np.full((b, N + 1, N + 1), NEG)
        A2[:, :N, :N] = np.where(nmask[:, :, None] & nmask[:, None, :], A[r2, non[:, :, None], non[:, None, :]], NEG)
        bi, jj = np.nonzero(nmask)
        A2[bi, n[bi], jj] = mrow[bi, jj]
        A2[bi, jj, n[bi]] = mcol[bi, jj]
        levels.append((ids, heads, cyc, cmask, non, nmask, n, mheads, mdeps))
        A, m = A2, n + 1

    for ids, heads, cyc, cmask, non, nmask, n, mheads, mdeps in reversed(levels):  # expand, last contraction first
        b, M, N = len(ids), heads.shape[1], non.shape[1]
        rows = np.arange(b)
        small = out[ids]  # trees over the contracted nodes
        h = small[:, :N]
        to_cycle = h == n[:, None]
        head = np.where(to_cycle, np.take_along_axis(cyc, mdeps, 1), np.take_along_axis(non, np.minimum(h, N - 1), 1))
        big = np.zeros((b, M), dtype=np.int64)
        bi, jj = np.nonzero(nmask)
        big[bi, non[bi, jj]] = head[bi, jj]
        bi, kk = np.nonzero(cmask)
        big[bi, cyc[bi, kk]] = heads[bi, cyc[bi, kk]]
        outside = small[rows, n]  # the contracted cycle's head, an outside node
        big[rows, cyc[rows, mheads[rows, outside]]] = non[rows, outside]
        out[ids, :M] = big
        out[ids, M:] = 0

    roots = ((out == 0) & (np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] < L[:, None])).sum(1)
    assert (roots == 1).all(), "Rescaling by the lowest score should have prevented using multiple root edges"
    return out


# ---------------------------------------------------------------------------------------------------- Stanza hook

_GROUPS: dict[int, tuple[Any, np.ndarray]] = {}


def _label_groups(vocab: Any, num_relations: int) -> np.ndarray:
    """For each raw relation id, its head-constraint group (index) or -1; built once per vocabulary."""
    from stanza.models.common.vocab import VOCAB_PREFIX_SIZE
    from stanza.models.depparse.head_constraints import DEPREL_TO_GROUP

    key = id(vocab)
    if key not in _GROUPS or _GROUPS[key][0] is not vocab or len(_GROUPS[key][1]) != num_relations:
        names = sorted(set(DEPREL_TO_GROUP.values()))
        rels = vocab.unmap([r + VOCAB_PREFIX_SIZE for r in range(num_relations)])
        table = np.array([names.index(DEPREL_TO_GROUP[r]) if r in DEPREL_TO_GROUP else -1 for r in rels])
        _GROUPS[key] = (vocab, table)
    return _GROUPS[key][1]


def violations(raw: np.ndarray, groups: np.ndarray, heads: np.ndarray, is_word: np.ndarray) -> set[int]:
    """Sentences in which one head has two dependents of one constrained group (two subjects, two objects).

    raw (B, T-1): each word's relation id without the vocabulary prefix; groups: ``_label_groups``; heads (B, T);
    is_word (B, T-1): which positions are words."""
    B, T = heads.shape
    g = groups[raw]  # (B, T-1)
    count = np.zeros((B, T, max(int(groups.max(initial=-1)) + 1, 1)), dtype=np.int64)
    bi, jj = np.nonzero(is_word & (g >= 0))
    np.add.at(count, (bi, heads[bi, jj + 1], g[bi, jj]), 1)
    return set(np.nonzero((count > 1).any(axis=(1, 2)))[0].tolist())


def assemble(vocab: Any, lens: np.ndarray, heads: np.ndarray, ids: np.ndarray, violated: set[int],
             arc_logp: np.ndarray, label_logp: Callable[[int], np.ndarray]) -> list[list[list[Any]]]:
    """Stanza's per-sentence output [[head, relation], ...] from the decoded heads (B, T) and relation ids (B, T-1,
    with the vocabulary prefix); a sentence in ``violated`` goes to Stanza's own repair, on exactly the inputs it
    would get: its arc log-probs and ``label_logp(i)``, its (T0, T0, R) relation log-probs."""
    from stanza.models.common.vocab import VOCAB_PREFIX_SIZE
    from stanza.models.depparse.head_constraints import resolve_head_constraint_violations

    is_word = np.arange(1, heads.shape[1])[None, :] < lens[:, None]
    flat = vocab.unmap(ids[is_word].tolist())
    out, k = [], 0
    for i in range(len(lens)):
        nw = int(lens[i]) - 1
        if i in violated:
            l = nw + 1
            tree, raw_ids = resolve_head_constraint_violations(arc_logp[i][:l, :l], label_logp(i)[:l, :l, :],
                                                               heads[i, :l].copy(), vocab)
            rels, hs = vocab.unmap([r + VOCAB_PREFIX_SIZE for r in raw_ids]), tree[1:]
        else:
            rels, hs = flat[k:k + nw], heads[i, 1:nw + 1]
        k += nw
        out.append([[hs[j], rels[j]] for j in range(nw)])
    return out


def decode_graph_predictions(vocab: Any, batch_size: int, preds: Sequence[np.ndarray], sentlens: Sequence[int],
                             resolve_head_constraints: bool = False) -> list[list[list[Any]]]:
    """Stanza's ``GraphParser.decode_graph_predictions`` for a whole batch at once, with identical output.

    preds: Stanza's (arc log-probs (B, T, T), best relation ids (B, T, T), relation log-probs (B, T, T, R)).
    """
    from stanza.models.common.vocab import VOCAB_PREFIX_SIZE

    lens = np.asarray(sentlens, dtype=np.int64)
    B = len(lens)
    heads = mst_heads(preds[0], lens)  # (B, T)
    T = heads.shape[1]
    rows, words = np.arange(B)[:, None], np.arange(1, T)[None, :]
    is_word = words < lens[:, None]  # (B, T-1)
    hw = heads[:, 1:]
    if resolve_head_constraints:
        raw = preds[2][rows, words, hw].argmax(-1)  # (B, T-1): best relation on each chosen arc
        violated = violations(raw, _label_groups(vocab, preds[2].shape[-1]), heads, is_word)
        ids = raw + VOCAB_PREFIX_SIZE
    else:
        ids = preds[1][rows, words, hw]
        violated = set()
    return assemble(vocab, lens, heads, ids, violated, preds[0], lambda i: preds[2][i])[:batch_size]


def use_batched_decoder(nlp: Any, on: bool = True) -> bool:
    """Decode this Pipeline's parses with ``decode_graph_predictions`` (``on=False`` restores Stanza's own).

    Returns whether the parser is one this applies to (Stanza's graph parser); other parsers are left alone.
    """
    from stanza.models.depparse.model import GraphParser

    proc = nlp.processors.get("depparse")
    model = getattr(getattr(proc, "trainer", None), "model", None)
    if not isinstance(model, GraphParser):
        return False
    if on:
        model.decode_graph_predictions = decode_graph_predictions
    else:
        model.__dict__.pop("decode_graph_predictions", None)
    return True
