"""The DeFrag model: two small projections into one h-dimensional fragment space.

    image fragment     v = W_m x + b_m                          x: a cached region feature (D,)
    sentence fragment  s = ReLU(W_R [W_e w1 ; W_e w2] + b_R)    (R, w1, w2): a dependency triple

W_e holds d-dimensional word vectors; W_R, b_R exist once per relation type (the paper) or once for all
(``shared_relation=True``, the original code).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class DeFrag(nn.Module):
    def __init__(self, feat_dim: int, n_words: int, n_relations: int, h: int = 1000, d: int = 200,
                 shared_relation: bool = False, word_vectors: Tensor | None = None, freeze_words: bool = False):
        super().__init__()
        if min(feat_dim, n_words, h, d) < 1 or n_relations < (0 if shared_relation else 1):
            raise ValueError(f"DeFrag needs positive sizes, got feat_dim={feat_dim} n_words={n_words} "
                             f"n_relations={n_relations} h={h} d={d}")
        self.feat_dim, self.n_words, self.n_relations, self.h, self.d = feat_dim, n_words, n_relations, h, d
        self.shared_relation = shared_relation
        self.image_proj = nn.Linear(feat_dim, h)  # W_m, b_m
        if word_vectors is None:
            self.words = nn.Embedding(n_words, d)  # W_e
            nn.init.normal_(self.words.weight, std=d ** -0.5)
        else:  # pretrained rows; no random draw, so the other weights do not depend on the table's size
            if tuple(word_vectors.shape) != (n_words, d):
                raise ValueError(f"word vectors have shape {tuple(word_vectors.shape)}, expected ({n_words}, {d})")
            self.words = nn.Embedding(n_words, d, _weight=word_vectors.detach().clone().float())
        self.words.weight.requires_grad_(not freeze_words)
        n_mats = 1 if shared_relation else n_relations
        bound = (2 * d) ** -0.5  # nn.Linear's default range for fan-in 2d
        self.rel_weight = nn.Parameter(torch.empty(n_mats, h, 2 * d).uniform_(-bound, bound))  # W_R
        self.rel_bias = nn.Parameter(torch.empty(n_mats, h).uniform_(-bound, bound))  # b_R
        # how the per-relation products run: None = one padded batched matmul on CUDA (few kernel launches),
        # a loop over the relations present on the CPU (no padding flops); both give the same result
        self.relation_batched: bool | None = None

    @torch.no_grad()
    def add_words(self, rows: Tensor) -> None:
        """Append word vectors (k, d) as rows n_words.. of W_e (a query word outside the trained vocabulary whose
        pretrained vector is known); their gradient setting follows the existing rows."""
        w = self.words.weight
        grad = w.requires_grad
        self.words = nn.Embedding(self.n_words + len(rows), self.d,
                                  _weight=torch.cat([w.detach(), rows.to(w.device, w.dtype)]))
        self.words.weight.requires_grad_(grad)
        self.n_words += len(rows)

    def image_fragments(self, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """feats (N, K, D), mask (N, K) bool -> vecs (Ni, h) of the unmasked rows, owner (Ni,) image index."""
        owner, row = mask.nonzero(as_tuple=True)  # (Ni,), (Ni,) padded rows never take part
        x = feats[owner, row].to(self.image_proj.weight.dtype)  # (Ni, D) float16 cache -> compute dtype
        return self.image_proj(x), owner

    def sentence_fragments(self, rel: Tensor, w1: Tensor, w2: Tensor, owner: Tensor, *,
                           max_group: int | None = None, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Triples (T,) relation, head and dependent ids with owner (T,) -> vecs (T, h), owner (T,).

        ``max_group`` (model/step.py's fixed layout): no relation has more triples than this among the rows that
        ``keep`` (T,) bool marks (the others are padding, their vectors garbage); the per-relation products then
        run as one batched matmul of a fixed size, with no host sync.
        """
        e = torch.cat([self.words(w1), self.words(w2)], dim=1)  # (T, 2d)
        if self.shared_relation:
            return torch.relu(e @ self.rel_weight[0].T + self.rel_bias[0]), owner
        if max_group is not None:
            s = self._relations_fixed(e, rel, max_group, torch.ones_like(rel, dtype=torch.bool) if keep is None
                                      else keep)
        else:
            batched = e.is_cuda if self.relation_batched is None else self.relation_batched
            s = self._relations_batched(e, rel) if batched else self._relations_looped(e, rel)  # (T, h)
        return torch.relu(s + self.rel_bias[rel]), owner

    def _relations_looped(self, e: Tensor, rel: Tensor) -> Tensor:
        """W_R e per triple: sort by relation, one matmul per relation present, undo the sort."""
        order = torch.argsort(rel, stable=True)
        counts = torch.bincount(rel, minlength=self.n_relations).tolist()  # one device sync per batch
        weights = self.rel_weight.unbind(0)  # views; the backward stacks one (R, h, 2d) gradient, not R of them
        pieces, start = [], 0
        for r, n in enumerate(counts):
            if n:
                pieces.append(e[order[start:start + n]] @ weights[r].T)  # (n, h)
                start += n
        out = torch.cat(pieces) if pieces else e.new_zeros(0, self.h)  # (T, h) in relation order
        return torch.empty_like(out).index_copy(0, order, out)  # back to the input order

    def _relations_batched(self, e: Tensor, rel: Tensor) -> Tensor:
        """W_R e per triple as one batched matmul over relations, each relation's triples padded to the
        largest group of this batch (few kernel launches)."""
        n_max = int(torch.bincount(rel, minlength=self.n_relations).max()) if len(rel) else 0  # one device sync
        return self._relations_fixed(e, rel, n_max, torch.ones_like(rel, dtype=torch.bool))

    def _relations_fixed(self, e: Tensor, rel: Tensor, n_max: int, keep: Tensor) -> Tensor:
        """``_relations_batched`` with the group size fixed at ``n_max`` (>= every relation's count of kept
        triples): (R, n_max + 1, 2d) x (R, 2d, h), every shape known before the data, no host sync. Padding rows
        (``~keep``) share one spare slot, so they never take a real triple's place."""
        R, T = self.n_relations, len(rel)
        key = torch.where(keep, rel, R)  # (T,) padding sorts after every relation
        order = torch.argsort(key, stable=True)
        k = key[order]  # (T,) sorted
        counts = torch.zeros(R + 1, dtype=torch.long, device=rel.device).index_add_(0, key, torch.ones_like(key))
        pos = torch.arange(T, device=rel.device) - (torch.cumsum(counts, 0) - counts)[k]  # (T,) slot in group
        real = k < R
        r, p = torch.where(real, k, 0), torch.where(real, pos, n_max)  # padding -> slot n_max of relation 0
        x = e.new_zeros(R, n_max + 1, e.shape[1]).index_put((r, p), e[order])  # (R, n_max + 1, 2d)
        out = torch.bmm(x, self.rel_weight.transpose(1, 2))[r, p]  # (T, h) in sorted order
        return torch.empty_like(out).index_copy(0, order, out)

    def config(self) -> dict:
        """What rebuilds this module (plain types: stored in checkpoints loaded with weights_only=True)."""
        return {"feat_dim": self.feat_dim, "n_words": self.n_words, "n_relations": self.n_relations,
                "h": self.h, "d": self.d, "shared_relation": self.shared_relation,
                "freeze_words": not self.words.weight.requires_grad}
