"""One training step of DeFrag, in two forms that compute the same loss.

    flat_step      the readable form (the trainer's before): real fragments only, owners as index lists,
                   ``defrag_cost`` with autograd
    padded_step    the trainer's form: every image K rows (masked), sentence fragments padded to ``T`` with
                   owner P, ``padded_cost`` with its closed-form gradient

The padded form has no data-dependent shape, so with ``T`` and the relation-group size fixed for an epoch
(``EpochPlan``) a step runs on a GPU without a host sync and can be compiled or captured; on the CPU ``T`` is the
batch's own triple count (no padding flops), unless the step is compiled. Both return ``(loss per pair, fragment, global)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .defrag import DeFrag
from .objective import defrag_cost, padded_cost
from .store import Split


def _round_up(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


@dataclass
class EpochPlan:
    """The batches of an epoch as device tensors, and the fixed sizes every batch of it fits.

    ``batches[b]`` (P_b,) caption indices; ``max_triples`` >= every batch's triple count; ``max_group`` >= every
    batch's largest number of triples of one relation (the padded relation matmul's group size). Both are
    rounded up so that most epochs share the same shapes (a compiled step is reused)."""
    batches: list[Tensor]
    max_triples: int
    max_group: int


def plan_epoch(split: Split, batches: list[Tensor], n_relations: int, device: torch.device) -> EpochPlan:
    """Sizes of an epoch's batches (one gather of all its triples, counted on the CPU); the batches move to
    ``device`` in one copy."""
    sizes = [len(b) for b in batches]
    caps = torch.cat(batches).cpu() if batches else torch.zeros(0, dtype=torch.long)
    rel, _, _, owner = (t.cpu() for t in split.triples(caps))  # (sum T,): every triple of the epoch once
    batch_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    per_batch = torch.bincount(batch_of[owner], minlength=len(sizes))  # (nb,) triples per batch
    groups = torch.bincount(batch_of[owner] * max(1, n_relations) + rel, minlength=len(sizes) * max(1, n_relations))
    max_t = int(per_batch.max()) if len(sizes) else 0
    max_g = int(groups.max()) if len(groups) else 0
    moved = caps.to(device).split(sizes) if batches else []
    return EpochPlan(list(moved), _round_up(max_t, 64), _round_up(max_g, 16))


def flat_step(model: DeFrag, split: Split, caps: Tensor, device: torch.device,
              objective: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The batch ``caps`` (P,) through the model and ``defrag_cost``: (loss per pair, fragment, global)."""
    caps = caps.to(split.store.device)
    feats, mask = split.images(split.caption_image[caps])  # (P, K, D) float16, (P, K)
    rel, w1, w2, owner = split.triples(caps)  # (T,) each
    iv, io = model.image_fragments(feats.to(device, non_blocking=True), mask.to(device))
    sv, so = model.sentence_fragments(rel.to(device), w1.to(device), w2.to(device), owner.to(device))
    total, parts = defrag_cost(iv, io, sv, so, len(caps), **objective)
    P = len(caps)
    return total / P, parts["fragment"].detach() / P, parts["global"].detach() / P


def padded_loss(model: DeFrag, feats: Tensor, mask: Tensor, rel: Tensor, w1: Tensor, w2: Tensor, owner: Tensor,
                objective: dict[str, Any], max_group: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The model and the cost on one gathered batch in the fixed layout (the part a compiler may capture):
    feats (P, K, D) float16, mask (P, K), triples (T,) with owner (T,) in [0, P] -> (loss per pair, fragment,
    global)."""
    P = feats.shape[0]
    v = model.image_proj(feats.to(model.image_proj.weight.dtype))  # (P, K, h): padded rows too, masked below
    s, _ = model.sentence_fragments(rel, w1, w2, owner, max_group=max_group, keep=owner < P)  # (T, h)
    total, parts = padded_cost(v, mask, s, owner, **objective)
    return total / P, parts["fragment"] / P, parts["global"] / P


def padded_step(model: DeFrag, split: Split, caps: Tensor, device: torch.device, objective: dict[str, Any],
                max_triples: int | None = None, max_group: int | None = None,
                loss_fn: Callable[..., tuple[Tensor, Tensor, Tensor]] = padded_loss) -> tuple[Tensor, Tensor, Tensor]:
    """The same loss as ``flat_step`` in the fixed layout. ``max_triples``/``max_group`` fix the shapes (no host
    sync); None sizes them from this batch. ``loss_fn``: ``padded_loss`` or a compiled form of it."""
    caps = caps.to(split.store.device)
    feats, mask = split.images(split.caption_image[caps])  # (P, K, D), (P, K)
    rel, w1, w2, owner = split.padded_triples(caps, max_triples)  # (T,) each, owner P = padding
    return loss_fn(model, feats.to(device, non_blocking=True), mask.to(device), rel.to(device), w1.to(device),
                   w2.to(device), owner.to(device), objective, max_group)
