"""The DeFrag objective (Karpathy, Joulin, Fei-Fei 2014, eqs. 3-8) as pure functions of fragment vectors.

A batch holds ``num_pairs`` image-sentence pairs; pair k is image k with sentence k. Fragments are flat:
image fragment i belongs to image ``img_owner[i]``, sentence fragment j to sentence ``sent_owner[j]``.
Every quantity below comes from one matmul, ``dots = img_vecs @ sent_vecs.T`` (Ni, Ns), plus masks and
segment sums over owners: no Python loop over fragments or pairs.

Both terms are *sums* over the batch; the trainer decides the normalisation.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pair_scores(img_vecs: Tensor, img_owner: Tensor, n_images: int, sent_vecs: Tensor, sent_owner: Tensor,
                n_sents: int, *, smooth: float = 10.0, threshold: bool = True,
                dots: Tensor | None = None) -> Tensor:
    """Smoothed global scores S_kl for every image k and sentence l (indexed independently): (n_images, n_sents).

    S_kl = sum_{i in k, j in l} max(0, v_i . s_j) / (|l| + smooth), where |l| is the number of sentence l's
    fragments; with ``threshold=False`` the plain dot is summed. A sentence (or image) without fragments
    scores 0. ``dots`` may pass a precomputed ``img_vecs @ sent_vecs.T`` (the objective shares its own).
    """
    if dots is None:
        dots = img_vecs @ sent_vecs.T  # (Ni, Ns)
    part = dots.clamp(min=0) if threshold else dots
    # segment sums over owners: rows by image, then columns by sentence (index_add: O(Ni * Ns), no one-hot)
    by_image = part.new_zeros(n_images, part.shape[1]).index_add(0, img_owner, part)  # (n_images, Ns)
    s = part.new_zeros(n_images, n_sents).index_add(1, sent_owner, by_image)  # (n_images, n_sents)
    n_frag = torch.bincount(sent_owner, minlength=n_sents).to(part.dtype)  # (n_sents,)
    return s / (n_frag + smooth)


def fragment_targets(dots: Tensor, same: Tensor, use_mil: bool = True) -> Tensor:
    """The fragment labels y (Ni, Ns) in {-1, 0, +1}, a constant for the gradient.

    Without MIL: +1 where image and sentence fragment come from the same pair, else -1.
    With MIL: inside a pair y = sign(dot) (0 counts neither way), and a sentence fragment left without any +1
    gets +1 on its highest-scoring fragment of its own image (the first one on ties).
    """
    dots = dots.detach()
    neg = -torch.ones_like(dots)
    if not use_mil:
        return torch.where(same, torch.ones_like(dots), neg)
    y = torch.where(same, torch.sign(dots), neg)
    lonely = ~(y > 0).any(0) & same.any(0)  # (Ns,) columns with candidates but no positive
    if dots.shape[0]:
        best = dots.masked_fill(~same, float("-inf")).argmax(0)  # (Ns,) first maximum
        force = torch.zeros_like(same)
        force[best, torch.arange(dots.shape[1], device=dots.device)] = lonely  # no host sync: masks only
        y = torch.where(force, torch.ones_like(y), y)
    return y


def defrag_cost(img_vecs: Tensor, img_owner: Tensor, sent_vecs: Tensor, sent_owner: Tensor, num_pairs: int, *,
                use_fragment: bool = True, use_global: bool = True, use_mil: bool = True,
                fragment_margin: float = 1.0, fragment_scale: float = 1.0, global_margin: float = 40.0,
                global_scale: float = 0.5, smooth: float = 10.0,
                threshold_global: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeFrag cost of a batch of ``num_pairs`` image-sentence pairs: ``(total, {"fragment", "global"})``.

    img_vecs (Ni, h), img_owner (Ni,) in [0, num_pairs); sent_vecs (Ns, h), sent_owner (Ns,) in [0, num_pairs).
    A term that is switched off is a zero in ``parts`` and adds nothing to ``total``.
    """
    if not (use_fragment or use_global):
        raise ValueError("defrag_cost needs at least one of use_fragment, use_global")
    dots = img_vecs @ sent_vecs.T  # (Ni, Ns) every fragment against every fragment: the one matmul
    zero = dots.new_zeros(())
    frag = glob = zero

    if use_fragment:
        same = img_owner[:, None] == sent_owner[None, :]  # (Ni, Ns) fragments of the same pair
        y = fragment_targets(dots, same, use_mil)  # (Ni, Ns) in {-1, 0, 1}
        pos, negs = (y > 0).to(dots.dtype), (y < 0).to(dots.dtype)
        # each sentence fragment's column: positives share weight 1, negatives share weight 1
        w = pos / pos.sum(0).clamp(min=1) + negs / negs.sum(0).clamp(min=1)  # (Ni, Ns)
        frag = fragment_scale * (w * (fragment_margin - y * dots).clamp(min=0)).sum()

    if use_global:
        s = pair_scores(img_vecs, img_owner, num_pairs, sent_vecs, sent_owner, num_pairs, smooth=smooth,
                        threshold=threshold_global, dots=dots)  # (P, P) image k x sentence l
        diag = s.diagonal()  # (P,) S_kk
        off = ~torch.eye(num_pairs, dtype=torch.bool, device=s.device)
        rank_images = (s - diag[None, :] + global_margin).clamp(min=0)  # S_lk - S_kk: other images, sentence k
        rank_sents = (s - diag[:, None] + global_margin).clamp(min=0)  # S_kl - S_kk: image k, other sentences
        glob = global_scale * ((rank_images + rank_sents) * off).sum()

    return frag + glob, {"fragment": frag, "global": glob}
