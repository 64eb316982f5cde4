"""Choosing the final detections from per-class box predictions: one pure function both backends share.

torchvision and detectron2 both score every proposal for every class, regress one box per (proposal, class),
run NMS separately per class, and keep the best-scoring survivors. Class-wise NMS keeps the same proposal
several times under different labels (a "dog" and a "cat" box that are nearly the same box). DeFrag wants 19
*different* regions, so after the detector's NMS we keep one detection per proposal: its best-scoring class.
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, k: int, nms_thresh: float,
                      score_thresh: float = 0.0, min_box: float = 1e-2,
                      start: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` detections after per-class NMS, at most one per proposal.

    boxes  (P, C, 4)  xyxy box of proposal p regressed for class c (foreground classes only)
    scores (P, C)     probability of class c for proposal p
    Returns boxes (n, 4), scores (n,), class column (n,), proposal index (n,), n <= k, by descending score.

    Same result as running NMS over all P*C candidates (the detector's stock rule with score threshold
    ``score_thresh``) and then deduplicating: greedy NMS decides each box from higher-scoring boxes only, so NMS
    over the best ``m`` candidates is a prefix of NMS over all of them. We start with ``start`` candidates and
    double until k distinct proposals survive or the candidates run out: cheap even with score_thresh 0.
    Boxes with a side below ``min_box`` are dropped first (torchvision's ``remove_small_boxes``); ``min_box=0``
    keeps every nonempty box (both sides > 0: detectron2's rule, whose empty boxes overlap nothing in NMS).
    """
    num_p, num_c = scores.shape
    flat_scores = scores.reshape(-1)  # (P*C,)  candidate i is proposal i // C, class i % C
    flat_boxes = boxes.reshape(-1, 4)
    wh = flat_boxes[:, 2:] - flat_boxes[:, :2]
    valid = (flat_scores > score_thresh) & ((wh >= min_box) if min_box > 0 else (wh > 0)).all(dim=1)
    cand = torch.nonzero(valid).squeeze(1)
    order = cand[torch.argsort(flat_scores[cand], descending=True, stable=True)]
    empty = order[:0]
    if order.numel() == 0 or k <= 0:
        return flat_boxes[empty], flat_scores[empty], empty, empty
    m = min(max(start, k), order.numel())
    while True:
        top = order[:m]
        kept = top[batched_nms(flat_boxes[top], flat_scores[top], top % num_c, nms_thresh)]  # by score
        prop = kept // num_c
        pos = torch.arange(prop.numel(), device=prop.device)
        first = torch.full((num_p,), prop.numel(), dtype=torch.long, device=prop.device)
        first = first.scatter_reduce(0, prop, pos, reduce="amin")
        chosen = kept[first[prop] == pos][:k]  # the best class of each proposal, in score order
        if chosen.numel() >= k or m == order.numel():
            break
        m = min(2 * m, order.numel())
    return flat_boxes[chosen], flat_scores[chosen], chosen % num_c, chosen // num_c
