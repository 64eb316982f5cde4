"""The DeFrag objective (Karpathy, Joulin, Fei-Fei 2014, eqs. 3-8) as pure functions of fragment vectors.

A batch holds ``num_pairs`` image-sentence pairs; pair k is image k with sentence k. Fragments are flat:
image fragment i belongs to image ``img_owner[i]``, sentence fragment j to sentence ``sent_owner[j]``.
Every quantity below comes from one matmul, ``dots = img_vecs @ sent_vecs.T`` (Ni, Ns), plus masks and
segment sums over owners: no Python loop over fragments or pairs.

Both terms are *sums* over the batch; the trainer decides the normalisation.
"""
from __future__ import annotations

from typing import Any

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


# ---------------------------------------------------------------------------------------------- fixed layout
# The trainer's form of the same cost: every image of a batch has K fragment rows (padded ones masked) and the
# sentence fragments are one flat list padded at its end (owner == P), so every shape depends only on (P, K, T)
# and owners never need a nonzero/bincount: the step has no host sync and can be captured (CUDA graphs). The
# gradient with respect to the dots is written out in closed form, so the backward is one multiply instead of
# autograd's chain through every mask and hinge.

def padded_cost_and_grad(dots: Tensor, img_mask: Tensor, sent_owner: Tensor, *, use_fragment: bool = True,
                         use_global: bool = True, use_mil: bool = True, fragment_margin: float = 1.0,
                         fragment_scale: float = 1.0, global_margin: float = 40.0, global_scale: float = 0.5,
                         smooth: float = 10.0, threshold_global: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``defrag_cost`` on the fixed layout, with its gradient: ``(fragment, global, d cost / d dots)``.

    dots (P*K, T): image fragment (k, r) at row k*K + r against sentence fragment t; img_mask (P, K) bool;
    sent_owner (T,) in [0, P], P marking a padding column. Padded rows and columns take no part in either term.
    Written for few passes over the (P*K, T) matrices (the CPU step is bound by them).
    """
    if not (use_fragment or use_global):
        raise ValueError("the DeFrag cost needs at least one of use_fragment, use_global")
    P, K = img_mask.shape
    n, T = dots.shape  # n = P * K
    dots = dots.detach()
    cols = torch.arange(T, device=dots.device)
    row_ok = img_mask.reshape(n)  # (n,)
    invalid = ~row_ok[:, None] | (sent_owner >= P)[None, :]  # (n, T) padding on either side
    frag = glob = dots.new_zeros(())

    if use_fragment:
        # a column's own image is the K-row block of its owner: MIL and the positives live there, (T, K)
        own_rows = sent_owner.clamp(max=P - 1)  # (T,) padding columns read block P-1, masked
        own_ok = img_mask[own_rows] & (sent_owner < P)[:, None]  # (T, K)
        own_dots = dots.view(P, K, T)[own_rows, :, cols]  # (T, K)
        if use_mil:
            own_y = torch.sign(own_dots).masked_fill_(~own_ok, 0.0)  # inside a pair: sign(v.s); 0 neither way
            lonely = ~(own_y > 0).any(1) & own_ok.any(1)  # (T,) columns with candidates but no positive
            best = own_dots.masked_fill(~own_ok, float("-inf")).argmax(1)  # (T,) first maximum of its image
            own_y[cols, best] = torch.where(lonely, 1.0, own_y[cols, best])
        else:
            own_y = own_ok.to(dots.dtype)
        n_pos = (own_y > 0).sum(1).clamp(min=1).to(dots.dtype)  # (T,)
        n_neg = (row_ok.sum() - own_ok.sum(1) + (own_y < 0).sum(1)).clamp(min=1).to(dots.dtype)  # (T,)
        # wy = w * y: positives of a column share weight 1, negatives share weight 1, y = 0 weighs nothing;
        # every fragment outside the column's own image is a negative (y = -1)
        wy = (-1.0 / n_neg)[None, :].expand(n, T).masked_fill(invalid, 0.0)  # (n, T)
        hinge = (dots + fragment_margin).clamp_(min=0)  # (n, T) max(0, m - y v.s) with y = -1
        own_wy = torch.where(own_y > 0, (1.0 / n_pos)[:, None], (-1.0 / n_neg)[:, None]).masked_fill_(own_y == 0, 0.0)
        wy.view(P, K, T)[own_rows, :, cols] = own_wy
        hinge.view(P, K, T)[own_rows, :, cols] = (fragment_margin - own_y * own_dots).clamp(min=0)
        frag = fragment_scale * torch.dot(wy.abs().view(-1), hinge.view(-1))
        grad = wy.masked_fill_(hinge <= 0, 0.0).mul_(-fragment_scale)  # d/d dots of w * max(0, m - y v.s)
    else:
        grad = torch.zeros_like(dots)

    if use_global:
        part = (dots.clamp(min=0) if threshold_global else dots.clone()).masked_fill_(invalid, 0.0)  # (n, T)
        onehot = (sent_owner[:, None] == torch.arange(P, device=dots.device)[None, :]).to(dots.dtype)  # (T, P)
        denom = onehot.sum(0) + smooth  # (P,) fragments of sentence l + smooth
        s = (part.view(P, K, T).sum(1) @ onehot) / denom  # (P, P) S_kl: image k, sentence l
        diag = s.diagonal()
        off = 1.0 - torch.eye(P, dtype=dots.dtype, device=dots.device)
        rank_images = (s - diag[None, :] + global_margin) * off  # S_kl - S_ll: other images k of sentence l
        rank_sents = (s - diag[:, None] + global_margin) * off  # S_kl - S_kk: other sentences l of image k
        glob = global_scale * (rank_images.clamp(min=0) + rank_sents.clamp(min=0)).sum()
        a_img, a_sent = (rank_images > 0).to(dots.dtype), (rank_sents > 0).to(dots.dtype)  # (P, P) active
        g = a_img + a_sent - torch.diag(a_img.sum(0) + a_sent.sum(1))  # d glob / d S, before the scale
        coef = ((global_scale * g / denom[None, :]) @ onehot.T)[:, None, :]  # (P, 1, T) d glob / d part
        # d part / d dots: 1 where the dot counts (positive when thresholded), else 0
        counts = part > 0 if threshold_global else ~invalid
        grad.view(P, K, T).add_(torch.where(counts.view(P, K, T), coef, 0.0))

    return frag, glob, grad


class _PaddedCost(torch.autograd.Function):
    """The cost of ``padded_cost_and_grad`` as a function of the dots: (total, fragment, global), of which only
    the total is differentiable; the backward scales the saved closed-form gradient."""

    @staticmethod
    def forward(ctx, dots, img_mask, sent_owner, options):  # type: ignore[override]
        frag, glob, grad = padded_cost_and_grad(dots, img_mask, sent_owner, **options)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(frag, glob)
        return frag + glob, frag, glob

    @staticmethod
    def backward(ctx, d_total, _d_frag, _d_glob):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * d_total, None, None, None


def padded_cost(img_vecs: Tensor, img_mask: Tensor, sent_vecs: Tensor, sent_owner: Tensor,
                **options: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeFrag cost of a batch in the fixed layout: ``(total, {"fragment", "global"})`` like ``defrag_cost``.

    img_vecs (P, K, h) with img_mask (P, K); sent_vecs (T, h) with sent_owner (T,) in [0, P] (P = padding).
    Only ``total`` carries a gradient (the parts are for logging).
    """
    P, K, h = img_vecs.shape
    dots = img_vecs.reshape(P * K, h) @ sent_vecs.T  # (P*K, T) the one matmul
    total, frag, glob = _PaddedCost.apply(dots, img_mask, sent_owner, options)
    return total, {"fragment": frag, "global": glob}
