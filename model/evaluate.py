"""Retrieval metrics, the evaluation protocols, and the chunked image x caption score matrix.

Everything here is a pure function of arrays: no files, no Luigi, no detector, no parser.

Conventions (the ones of the DeFrag / VSE evaluation code, written down):
- ranks start at 1;
- image annotation (image -> captions): an image's rank is the best rank among its own captions;
- image search (caption -> images): a caption's rank is the rank of its image;
- R@K is the fraction of queries whose rank is <= K (in [0, 1]); ``medr`` is ``floor(median(rank))``, which
  equals the ``floor(median(rank0)) + 1`` of the VSE code for 0-based ranks; ``meanr`` is the mean rank.
- Ties are broken pessimistically: a wrong candidate with exactly the score of the right one is ranked ahead
  of it. A constant score matrix therefore gets the worst possible ranks, never a lucky R@1. Ties among an
  image's *own* captions do not count against it (any of them is a correct answer).
- An image without captions is still a candidate for image search, but is not an annotation query; the
  number of queries of each direction is reported (``annotation.queries``, ``search.queries``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
_ROW_CHUNK = 1024  # rows of the (n_images, n_captions) comparison done at once: bounds temporary memory


def _as_numpy(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check(scores: Any, caption_image: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores)
    if s.dtype.kind not in "fiu":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64 if s.dtype == np.float64 else np.float32, copy=False)
    c = _as_numpy(caption_image)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n_images, n_captions), got shape {s.shape}")
    if c.ndim != 1 or c.shape[0] != s.shape[1]:
        raise ValueError(f"caption_image must be (n_captions,) = ({s.shape[1]},), got shape {c.shape}")
    if c.size and c.dtype.kind not in "iu":
        raise ValueError(f"caption_image must hold integer image indices, got dtype {c.dtype}")
    c = c.astype(np.int64, copy=False)
    if c.size and (c.min() < 0 or c.max() >= s.shape[0]):
        bad = int(np.flatnonzero((c < 0) | (c >= s.shape[0]))[0])
        raise ValueError(f"caption {bad} points at image {int(c[bad])}, outside [0, {s.shape[0]})")
    if np.isnan(s).any():
        i, j = np.argwhere(np.isnan(s))[0]
        raise ValueError(f"scores hold NaN (first at image {i}, caption {j}): the model or its inputs are broken")
    return s, c


def search_ranks(scores: Any, caption_image: Any) -> np.ndarray:
    """(n_captions,) 1-based rank of each caption's own image among all images (pessimistic ties)."""
    s, c = _check(scores, caption_image)
    n_images, n_captions = s.shape
    own = s[c, np.arange(n_captions)]  # (n_captions,) score of the right image
    ranks = np.zeros(n_captions, np.int64)
    for i0 in range(0, n_images, _ROW_CHUNK):
        ranks += (s[i0:i0 + _ROW_CHUNK] >= own[None, :]).sum(0)  # counts the right image itself once
    return ranks


def annotation_ranks(scores: Any, caption_image: Any) -> np.ndarray:
    """(n_images,) 1-based rank of each image's best own caption; 0 for an image without captions."""
    s, c = _check(scores, caption_image)
    n_images, n_captions = s.shape
    own = s[c, np.arange(n_captions)]
    best = np.full(n_images, -np.inf, s.dtype)
    np.maximum.at(best, c, own)  # (n_images,) score of the best own caption
    has = np.bincount(c, minlength=n_images) > 0
    ranks = np.zeros(n_images, np.int64)
    for i0 in range(0, n_images, _ROW_CHUNK):
        ranks[i0:i0 + _ROW_CHUNK] = (s[i0:i0 + _ROW_CHUNK] >= best[i0:i0 + _ROW_CHUNK, None]).sum(1)
    # own captions at or above the best one (the best itself and any tied with it) are not "ahead" of it
    own_ties = np.bincount(c, weights=(own >= best[c]), minlength=n_images).astype(np.int64)
    ranks = ranks - own_ties + 1
    ranks[~has] = 0
    return ranks


def summarize_ranks(ranks: np.ndarray, recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """R@K (fractions), medr, meanr and the number of queries of a vector of 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries to summarize: the split has no images or no captions")
    out = {f"r{k}": float((ranks <= k).mean()) for k in recall_at}
    out["medr"] = float(np.floor(np.median(ranks)))
    out["meanr"] = float(ranks.mean())
    out["queries"] = int(ranks.size)
    return out


def retrieval_metrics(scores: Any, caption_image: Any) -> dict[str, Any]:
    """Image annotation and image search metrics of one (n_images, n_captions) similarity matrix.

    ``caption_image[j]`` is the index (row of ``scores``) of caption j's image. Higher score = more similar.
    Returns ``{"annotation": {r1, r5, r10, medr, meanr, queries}, "search": {...}, "n_images", "n_captions"}``.
    """
    s, c = _check(scores, caption_image)
    a = annotation_ranks(s, c)
    return {"annotation": summarize_ranks(a[a > 0]), "search": summarize_ranks(search_ranks(s, c)),
            "n_images": int(s.shape[0]), "n_captions": int(s.shape[1])}


# ---------------------------------------------------------------------------------------------- protocols

def first_captions(caption_image: Any, per_image: int = 5) -> np.ndarray:
    """Indices of the first ``per_image`` captions of each image, in their original order.

    The published protocols use 5 captions per image; COCO has images with 6 or 7.
    ``per_image <= 0`` keeps all captions.
    """
    c = _as_numpy(caption_image).astype(np.int64)
    if per_image <= 0:
        return np.arange(c.size)
    seen: dict[int, int] = {}
    keep = []
    for j, i in enumerate(c.tolist()):
        if seen.get(i, 0) < per_image:
            seen[i] = seen.get(i, 0) + 1
            keep.append(j)
    return np.asarray(keep, np.int64)


def fold_metrics(scores: Any, caption_image: Any, fold_size: int = 1000) -> dict[str, Any]:
    """COCO's "1K" protocol: metrics of each consecutive block of ``fold_size`` images with their captions,
    and their mean. ``n_images`` must be a multiple of ``fold_size`` (COCO's 5K test = five 1K folds)."""
    s, c = _check(scores, caption_image)
    n_images = s.shape[0]
    if n_images == 0 or n_images % fold_size:
        raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
    folds = []
    for i0 in range(0, n_images, fold_size):
        cols = np.flatnonzero((c >= i0) & (c < i0 + fold_size))
        folds.append(retrieval_metrics(s[i0:i0 + fold_size][:, cols], c[cols] - i0))
    mean = {d: {k: float(np.mean([f[d][k] for f in folds])) for k in folds[0][d]}
            for d in ("annotation", "search")}
    return {**mean, "n_images": fold_size, "n_captions": float(np.mean([f["n_captions"] for f in folds])),
            "n_folds": len(folds), "folds": folds}


def protocol_metrics(scores: Any, caption_image: Any, fold_size: int = 1000) -> dict[str, Any]:
    """Every protocol that applies to a split: ``all`` (the whole split: Flickr8K/30K's 1,000 test images,
    COCO's "5K") and, when the split is a larger multiple of ``fold_size``, ``folds`` (COCO's "1K")."""
    s, c = _check(scores, caption_image)
    out: dict[str, Any] = {"all": retrieval_metrics(s, c)}
    if s.shape[0] > fold_size and s.shape[0] % fold_size == 0:
        out["folds"] = fold_metrics(s, c, fold_size)
    return out


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table laid out like the paper's: one row per (name -> retrieval_metrics result)."""
    head = ("| Model | Image Annotation R@1 | R@5 | R@10 | Med r | Image Search R@1 | R@5 | R@10 | Med r |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for name, m in rows.items():
        cells = []
        for d in ("annotation", "search"):
            cells += [f"{100 * m[d][f'r{k}']:.1f}" for k in RECALL_AT] + [f"{m[d]['medr']:g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- scoring

def chunk_images(n_fragment_rows: int, n_images: int, n_sent_fragments: int,
                 budget_bytes: int = 256 * 2**20) -> int:
    """Images per chunk so that a (chunk fragments x sentence fragments) float32 block fits ``budget_bytes``."""
    frags_per_image = max(1.0, n_fragment_rows / max(1, n_images))
    rows = budget_bytes / (4 * max(1, n_sent_fragments))
    return int(max(1, min(n_images, rows // frags_per_image)))


@torch.no_grad()
def score_matrix(img_vecs: torch.Tensor, img_owner: torch.Tensor, n_images: int,
                 sent_vecs: torch.Tensor, sent_owner: torch.Tensor, n_sents: int, *,
                 score_fn: Callable[..., torch.Tensor] | None = None, images_per_chunk: int | None = None,
                 budget_bytes: int = 256 * 2**20, **score_kwargs: Any) -> torch.Tensor:
    """(n_images, n_sents) DeFrag scores S_kl, computed a block of images at a time.

    ``score_fn`` is the objective's ``pair_scores`` (the default): the one definition of S_kl. Chunking over
    images bounds the fragment dot block to about ``budget_bytes``; fragments of one image need not be
    contiguous. img_vecs (F_i, h), img_owner (F_i,) in [0, n_images); sent_vecs (F_s, h), sent_owner (F_s,).
    """
    if score_fn is None:
        from model.objective import pair_scores as score_fn
    img_owner = img_owner.to(img_vecs.device)
    if images_per_chunk is None:
        images_per_chunk = chunk_images(img_vecs.shape[0], n_images, sent_vecs.shape[0], budget_bytes)
    out = torch.empty(n_images, n_sents, dtype=torch.float32)
    contiguous = bool((img_owner[1:] >= img_owner[:-1]).all()) if img_owner.numel() > 1 else True
    bounds = torch.searchsorted(img_owner, torch.arange(0, n_images + images_per_chunk, images_per_chunk,
                                                        device=img_owner.device)) if contiguous else None
    for n, i0 in enumerate(range(0, n_images, images_per_chunk)):
        i1 = min(n_images, i0 + images_per_chunk)
        if contiguous:
            sel = slice(int(bounds[n]), int(bounds[n + 1]))
        else:
            sel = ((img_owner >= i0) & (img_owner < i1)).nonzero().squeeze(1)
        block = score_fn(img_vecs[sel], img_owner[sel] - i0, i1 - i0, sent_vecs, sent_owner, n_sents,
                         **score_kwargs)  # (i1 - i0, n_sents)
        out[i0:i1] = block.float().cpu()
    return out
