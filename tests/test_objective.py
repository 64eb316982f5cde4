"""The vectorised DeFrag objective against a slow loop version written straight from its definition."""
from __future__ import annotations

import pytest
import torch

from model.objective import defrag_cost, padded_cost, pair_scores
from objective_reference import loop_cost, loop_pair_scores


# ---------------------------------------------------------------------------------------------- batches

def random_batch(seed, P=4, h=6, max_img=4, max_sent=3, empty_sentence=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n_img = torch.randint(1, max_img + 1, (P,), generator=g)
    n_sent = torch.randint(0 if empty_sentence else 1, max_sent + 1, (P,), generator=g)
    if empty_sentence:
        n_sent[0] = 0  # always one sentence without fragments
    io = torch.repeat_interleave(torch.arange(P), n_img)
    so = torch.repeat_interleave(torch.arange(P), n_sent)
    # shuffled owners: nothing may rely on fragments being grouped
    io = io[torch.randperm(len(io), generator=g)]
    so = so[torch.randperm(len(so), generator=g)]
    iv = (scale * torch.randn(len(io), h, generator=g, dtype=torch.float64)).requires_grad_()
    sv = (scale * torch.randn(len(so), h, generator=g, dtype=torch.float64)).requires_grad_()
    return iv, io, sv, so, P


SETTINGS = [
    dict(),
    dict(use_mil=False),
    dict(use_global=False),
    dict(use_fragment=False),
    dict(use_fragment=False, threshold_global=False),
    dict(fragment_margin=0.5, fragment_scale=2.0, global_margin=0.05, global_scale=0.25, smooth=2.0),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_and_gradients_match_loop(kw, seed):
    # small global margin in some settings so that both active and inactive hinges occur
    iv, io, sv, so, P = random_batch(seed)
    total, parts = defrag_cost(iv, io, sv, so, P, **kw)
    gi, gs = torch.autograd.grad(total, (iv, sv))
    ref_total, ref_parts = loop_cost(iv, io, sv, so, P, **kw)
    ri, rs = torch.autograd.grad(ref_total, (iv, sv))
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-10)
    for k in ("fragment", "global"):
        torch.testing.assert_close(parts[k].detach(), ref_parts[k].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gi, ri, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gs, rs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", [3, 4])
def test_small_global_margin_mixes_active_and_inactive_hinges(seed):
    iv, io, sv, so, P = random_batch(seed, P=5, max_img=5, max_sent=4, empty_sentence=False, scale=2.0)
    kw = dict(global_margin=0.05, use_fragment=False)
    s = pair_scores(iv, io, P, sv, so, P).detach()
    diff = (s - s.diagonal()[None, :] + 0.05)[~torch.eye(P, dtype=torch.bool)]
    assert (diff > 0).any() and (diff < 0).any()  # the test really exercises both sides of the hinge
    total, _ = defrag_cost(iv, io, sv, so, P, **kw)
    ref, _ = loop_cost(iv, io, sv, so, P, **kw)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(torch.autograd.grad(total, iv)[0], torch.autograd.grad(ref, iv)[0])


def test_mil_forces_one_positive_and_zero_dots_count_neither_way():
    # image 0: f0, f1; image 1: f2, f3, f4; image 2: f5, f6 (all zero: exact ties)
    iv = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [5.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]],
                      dtype=torch.float64, requires_grad=True)
    io = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    sv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    so = torch.tensor([0, 1, 2])
    total, parts = defrag_cost(iv, io, sv, so, 3, use_global=False)
    ref, _ = loop_cost(iv, io, sv, so, 3, use_global=False)
    torch.testing.assert_close(total, ref)
    # column 0: own dots -1, -2: no positive, so the best (f0) becomes +1 (hinge 2); negatives f1..f6 with
    #   dots -2, 5, 3, 0, 0, 0 -> hinges 0, 6, 4, 1, 1, 1 shared over 6
    # column 1: own dots 0, 0, 2 -> y = 0, 0, +1 (hinge 0); negatives f0, f1, f5, f6 all dot 0 -> hinge 1 each / 4
    # column 2: own dots 0, 0 (a tie) -> +1 on the first (f5, hinge 1), f6 y = 0; negatives f0..f4 with dots
    #   -1, -2, 5, 3, 2 -> hinges 0, 0, 6, 4, 3 shared over 5
    expected = 2 + 13 / 6 + 0 + 1 + 1 + 13 / 5
    assert float(total.detach()) == pytest.approx(expected)
    total.backward()
    # the tie went to f5: its gradient holds the positive's pull -s2 that f6 (y = 0 in column 2) lacks
    torch.testing.assert_close(iv.grad[5] - iv.grad[6], -sv[2].detach())


def test_empty_sentences_and_batches():
    iv = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    io = torch.tensor([0, 1, 1])
    sv = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    so = torch.zeros(0, dtype=torch.long)
    total, parts = defrag_cost(iv, io, sv, so, 2)
    # no sentence fragments: every S_kl is 0, so every hinge is the margin: 0.5 * 2 pairs * 2 ways * 40
    assert float(parts["fragment"].detach()) == 0.0
    assert float(parts["global"].detach()) == pytest.approx(0.5 * 2 * 2 * 40)
    s = pair_scores(iv, io, 2, sv, so, 3)
    assert s.shape == (2, 3) and float(s.detach().abs().sum()) == 0.0
    total.backward()  # no NaN from the empty matmul
    assert torch.isfinite(iv.grad).all()


def test_pair_scores_matches_loop_for_independent_images_and_sentences():
    g = torch.Generator().manual_seed(7)
    iv = torch.randn(9, 5, generator=g, dtype=torch.float64)
    io = torch.tensor([0, 0, 1, 2, 2, 2, 4, 4, 4])  # image 3 has no fragments
    sv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    so = torch.tensor([1, 1, 0, 3, 3, 5])  # sentences 2 and 4 have none
    for threshold in (True, False):
        got = pair_scores(iv, io, 5, sv, so, 6, smooth=3.0, threshold=threshold)
        ref = loop_pair_scores(iv, io, 5, sv, so, 6, smooth=3.0, threshold=threshold)
        torch.testing.assert_close(got, ref)
    assert float(got[3].abs().sum()) == 0.0 and float(got[:, [2, 4]].abs().sum()) == 0.0


def test_needs_a_term():
    iv, io, sv, so, P = random_batch(0)
    with pytest.raises(ValueError, match="at least one"):
        defrag_cost(iv, io, sv, so, P, use_fragment=False, use_global=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_matches_cpu():
    iv, io, sv, so, P = random_batch(5, P=6)
    cpu, _ = defrag_cost(iv, io, sv, so, P)
    gpu, _ = defrag_cost(iv.cuda(), io.cuda(), sv.cuda(), so.cuda(), P)
    torch.testing.assert_close(gpu.cpu(), cpu)


# ---------------------------------------------------------------------------------------------- fixed layout

def to_padded(iv, io, sv, so, P, extra_rows=1, extra_cols=3, seed=0):
    """A flat batch in the trainer's fixed layout: K rows per image (the image's fragments in their order, then
    masked rows of noise), sentence fragments flat with noise columns of owner P at the end."""
    g = torch.Generator().manual_seed(seed)
    n_img = torch.bincount(io, minlength=P)
    K = int(n_img.max()) + extra_rows
    h = iv.shape[1]
    rows = torch.randn(P, K, h, generator=g, dtype=iv.dtype)  # padding rows hold noise: they must not count
    mask = torch.zeros(P, K, dtype=torch.bool)
    place = torch.zeros(len(io), 2, dtype=torch.long)
    for k in range(P):
        mine = (io == k).nonzero().squeeze(1)
        place[mine, 0], place[mine, 1] = k, torch.arange(len(mine))
        mask[k, :len(mine)] = True
    pad_cols = torch.randn(extra_cols, h, generator=g, dtype=sv.dtype)
    iv_p = rows.index_put((place[:, 0], place[:, 1]), iv)  # keeps the graph to iv
    sv_p = torch.cat([sv, pad_cols])
    so_p = torch.cat([so, torch.full((extra_cols,), P)])
    return iv_p, mask, sv_p, so_p


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_layout_cost_and_closed_form_gradient_match_the_flat_cost(kw, seed):
    iv, io, sv, so, P = random_batch(seed, P=5, max_img=4, max_sent=4, scale=1.5)
    ref_total, ref_parts = defrag_cost(iv, io, sv, so, P, **kw)
    ri, rs = torch.autograd.grad(ref_total, (iv, sv))
    iv_p, mask, sv_p, so_p = to_padded(iv, io, sv, so, P, seed=seed)
    total, parts = padded_cost(iv_p, mask, sv_p, so_p, **kw)
    gi, gs = torch.autograd.grad(total, (iv, sv))
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-10)
    for k in ("fragment", "global"):
        torch.testing.assert_close(parts[k], ref_parts[k].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gi, ri, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gs, rs, rtol=1e-9, atol=1e-10)


def test_fixed_layout_global_hinges_both_sides_and_mil_ties():
    # a small margin: active and inactive global hinges both occur; the exact-tie MIL batch of the flat test
    for seed in (3, 4):
        iv, io, sv, so, P = random_batch(seed, P=5, max_img=5, max_sent=4, empty_sentence=False, scale=2.0)
        kw = dict(global_margin=0.05)
        ref, _ = defrag_cost(iv, io, sv, so, P, **kw)
        got, _ = padded_cost(*to_padded(iv, io, sv, so, P), **kw)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad(got, iv)[0], torch.autograd.grad(ref, iv)[0])
    iv = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [5.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]],
                      dtype=torch.float64, requires_grad=True)
    io = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    sv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    so = torch.tensor([0, 1, 2])
    ref, _ = defrag_cost(iv, io, sv, so, 3)
    got, _ = padded_cost(*to_padded(iv, io, sv, so, 3))
    assert float(got.detach()) == pytest.approx(float(ref.detach()))
    torch.testing.assert_close(torch.autograd.grad(got, iv)[0], torch.autograd.grad(ref, iv)[0])


def test_fixed_layout_padding_and_empty_sentences_take_no_part():
    iv, io, sv, so, P = random_batch(6, P=4)
    base, _ = padded_cost(*to_padded(iv, io, sv, so, P, extra_rows=0, extra_cols=0))
    for rows, cols in ((3, 0), (0, 7), (2, 5)):  # more padding of noise changes nothing
        got, _ = padded_cost(*to_padded(iv, io, sv, so, P, extra_rows=rows, extra_cols=cols, seed=rows + cols))
        torch.testing.assert_close(got, base, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        padded_cost(*to_padded(iv, io, sv, so, P), use_fragment=False, use_global=False)
