"""Batches of image-sentence pairs in which no image appears twice.

Two captions of one image in the same batch would make a "wrong" pair that is in fact right (the global term
would push apart an image and its own caption), so the sampler never builds such a batch and the objective
needs no mask. An epoch visits every caption once: captions are shuffled, each caption gets its rank among
its image's captions in that order (round r holds every image's r-th caption, so no image twice), each round is
cut into batches, and the order of all batches is shuffled. With 5 captions per image that is 5 rounds; only
a round's last batch can be short.
"""
from __future__ import annotations

import torch
from torch import Tensor


def epoch_batches(caption_image: Tensor, batch_size: int, generator: torch.Generator,
                  groups: list[Tensor] | None = None) -> list[Tensor]:
    """Caption indices (B,) of each batch of one epoch; ``caption_image`` (M,) gives each caption's image.

    ``groups`` (optional) are disjoint sets of caption indices (e.g. the captions of the images of a window of
    shards when features stream from disk): batches never mix groups, groups come in the given order, and the
    batches inside each group are shuffled. Without groups all batches of the epoch are shuffled together.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    caption_image = caption_image.cpu()
    if groups is None:
        groups = [torch.arange(caption_image.numel())]
    out: list[Tensor] = []
    for caps in groups:
        batches = _rounds(caps.cpu(), caption_image[caps.cpu()], batch_size, generator)
        order = torch.randperm(len(batches), generator=generator).tolist()
        out += [batches[i] for i in order]
    return out


def _rounds(caps: Tensor, img: Tensor, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    m = caps.numel()
    if m == 0:
        return []
    perm = torch.randperm(m, generator=generator)  # (m,) shuffled positions
    img_p = img[perm]  # (m,) image of each shuffled caption
    by_img = torch.argsort(img_p, stable=True)  # groups captions of one image, keeping shuffled order
    _, counts = torch.unique_consecutive(img_p[by_img], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # (m,) start of each run
    rank = torch.empty(m, dtype=torch.long)
    rank[by_img] = torch.arange(m) - starts  # (m,) r: this is the image's r-th caption in shuffled order
    seq = torch.argsort(rank * m + torch.arange(m))  # round 0 first, shuffled order inside a round
    rank_seq = rank[seq]
    batches: list[Tensor] = []
    for r in range(int(rank.max()) + 1):  # at most the largest number of captions of one image
        batches += list(caps[perm[seq[rank_seq == r]]].split(batch_size))
    return batches
