"""Retrieval metrics on hand-built score matrices whose ranks are known."""
import numpy as np
import pytest
import torch

from model.evaluate import (annotation_ranks, first_captions, fold_metrics, metrics_table, protocol_metrics,
                            retrieval_metrics, score_matrix, search_ranks, summarize_ranks)


def brute_force(scores, caption_image):
    """The definitions, one query at a time, ties pessimistic: the reference the vectorised code must match."""
    n_images, n_captions = scores.shape
    search = []
    for j in range(n_captions):
        right = scores[caption_image[j], j]
        search.append(1 + sum(scores[i, j] >= right for i in range(n_images) if i != caption_image[j]))
    annotation = []
    for i in range(n_images):
        own = [j for j in range(n_captions) if caption_image[j] == i]
        if not own:
            continue
        per_caption = [1 + sum(scores[i, j2] >= scores[i, j] for j2 in range(n_captions) if j2 not in own)
                       for j in own]
        annotation.append(min(per_caption))
    return np.array(annotation), np.array(search)


def test_perfect_scores_rank_everything_first():
    caption_image = np.repeat(np.arange(4), 5)
    scores = (np.arange(4)[:, None] == caption_image[None, :]).astype(np.float32)
    m = retrieval_metrics(scores, caption_image)
    for d in ("annotation", "search"):
        assert m[d]["r1"] == m[d]["r5"] == m[d]["r10"] == 1.0
        assert m[d]["medr"] == 1 and m[d]["meanr"] == 1
    assert (m["n_images"], m["n_captions"]) == (4, 20)
    assert m["annotation"]["queries"] == 4 and m["search"]["queries"] == 20


def test_known_ranks():
    # 3 images, 1 caption each; caption j belongs to image j.
    scores = np.array([[0.9, 0.1, 0.5],    # image 0: own caption 0 first -> rank 1
                       [0.8, 0.2, 0.7],    # image 1: own caption 1 last of 3 -> rank 3
                       [0.1, 0.3, 0.6]])   # image 2: own caption 2 first -> rank 1
    caption_image = np.array([0, 1, 2])
    np.testing.assert_array_equal(annotation_ranks(scores, caption_image), [1, 3, 1])
    # caption 0: column [0.9, 0.8, 0.1] -> image 0 first; caption 1: [0.1, 0.2, 0.3] -> image 1 second;
    # caption 2: [0.5, 0.7, 0.6] -> image 2 second
    np.testing.assert_array_equal(search_ranks(scores, caption_image), [1, 2, 2])
    m = retrieval_metrics(scores, caption_image)
    assert m["annotation"]["r1"] == pytest.approx(2 / 3)
    assert m["annotation"]["r5"] == 1.0
    assert m["annotation"]["medr"] == 1 and m["annotation"]["meanr"] == pytest.approx(5 / 3)
    assert m["search"]["r1"] == pytest.approx(1 / 3)
    assert m["search"]["medr"] == 2 and m["search"]["meanr"] == pytest.approx(5 / 3)


def test_annotation_takes_the_best_own_caption():
    # image 0 owns captions 0 and 1; caption 0 is ranked 4th, caption 1 2nd -> image rank 2
    caption_image = np.array([0, 0, 1, 1, 2])
    scores = np.array([[0.1, 0.8, 0.9, 0.2, 0.5],
                       [0.0, 0.0, 1.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 1.0]])
    assert annotation_ranks(scores, caption_image)[0] == 2


def test_ties_are_pessimistic():
    caption_image = np.repeat(np.arange(3), 2)  # 3 images x 2 captions
    scores = np.zeros((3, 6))
    # a constant matrix gets the worst ranks: every wrong candidate counts as ahead
    np.testing.assert_array_equal(search_ranks(scores, caption_image), [3] * 6)
    np.testing.assert_array_equal(annotation_ranks(scores, caption_image), [5] * 3)  # 4 wrong captions + 1
    m = retrieval_metrics(scores, caption_image)
    assert m["annotation"]["r1"] == 0.0 and m["search"]["r1"] == 0.0
    # one wrong caption tied with the best own caption: rank 2, not 1
    scores = np.array([[0.5, 0.2, 0.5, 0.1, 0.0, 0.0]] + [[0.0] * 6] * 2)
    assert annotation_ranks(scores, caption_image)[0] == 2
    # own captions tied with each other do not count against the image
    scores = np.array([[0.7, 0.7, 0.5, 0.1, 0.0, 0.0]] + [[0.0] * 6] * 2)
    assert annotation_ranks(scores, caption_image)[0] == 1


def test_images_with_fewer_than_five_captions():
    # image 0: 5 captions, image 1: 2 captions, image 2: none (a search candidate only), image 3: 1 caption
    caption_image = np.array([0, 0, 0, 0, 0, 1, 1, 3])
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 8))
    scores[0, :5] += 10  # image 0 and its captions find each other first
    scores[3, 7] = 20
    a = annotation_ranks(scores, caption_image)
    assert a[2] == 0 and a[0] == 1 and a[3] == 1
    m = retrieval_metrics(scores, caption_image)
    assert m["annotation"]["queries"] == 3 and m["search"]["queries"] == 8
    ref_a, ref_s = brute_force(scores, caption_image)
    np.testing.assert_array_equal(a[a > 0], ref_a)
    np.testing.assert_array_equal(search_ranks(scores, caption_image), ref_s)


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n_images = 7
    caption_image = rng.integers(0, n_images, size=23)
    scores = rng.integers(0, 4, size=(n_images, 23)).astype(np.float32)  # small integers: many ties
    ref_a, ref_s = brute_force(scores, caption_image)
    a = annotation_ranks(scores, caption_image)
    np.testing.assert_array_equal(a[a > 0], ref_a)
    np.testing.assert_array_equal(search_ranks(scores, caption_image), ref_s)


def test_torch_input_and_row_chunks(monkeypatch):
    import model.evaluate as ev

    rng = np.random.default_rng(3)
    caption_image = rng.integers(0, 9, size=40)
    scores = rng.normal(size=(9, 40))
    expect = retrieval_metrics(scores, caption_image)
    monkeypatch.setattr(ev, "_ROW_CHUNK", 2)  # the chunked loop must give the same ranks
    assert retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(caption_image)) == expect


def test_summary_conventions():
    s = summarize_ranks(np.array([1, 2, 7, 12]))
    assert (s["r1"], s["r5"], s["r10"]) == (0.25, 0.5, 0.75)
    assert s["medr"] == 4  # floor(median 4.5): the VSE convention floor(median(rank0)) + 1
    assert s["meanr"] == 5.5 and s["queries"] == 4


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="caption 1 points at image 5"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 5]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[0.0, np.nan]]), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"\(n_captions,\)"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics(np.zeros((2, 0)), np.zeros(0, np.int64))


def test_first_captions_keeps_five_per_image_in_order():
    caption_image = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(first_captions(caption_image, 5), [0, 1, 2, 3, 4, 5, 8, 9])
    np.testing.assert_array_equal(first_captions(caption_image, 0), np.arange(10))


def test_fold_protocol_is_the_mean_over_blocks():
    # 4 images in 2 folds of 2; fold 0 perfect, fold 1 reversed (rank 2 everywhere)
    caption_image = np.array([0, 1, 2, 3])
    scores = np.full((4, 4), -5.0)  # cross-fold scores are never compared within a fold
    scores[:2, :2] = np.eye(2)
    scores[2:, 2:] = 1 - np.eye(2)
    scores[0, 3] = scores[3, 0] = 100.0  # would hurt if folds leaked into each other
    f = fold_metrics(scores, caption_image, fold_size=2)
    assert f["n_folds"] == 2
    assert f["annotation"]["r1"] == 0.5 and f["search"]["r1"] == 0.5
    assert f["folds"][0]["annotation"]["r1"] == 1.0 and f["folds"][1]["search"]["medr"] == 2
    p = protocol_metrics(scores, caption_image, fold_size=2)
    assert set(p) == {"all", "folds"}
    assert set(protocol_metrics(scores, caption_image, fold_size=4)) == {"all"}
    with pytest.raises(ValueError, match="folds of 3"):
        fold_metrics(scores, caption_image, fold_size=3)


def test_metrics_table_layout():
    m = retrieval_metrics(np.eye(3), np.arange(3))
    table = metrics_table({"DeFrag (demo)": m})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Model | Image Annotation R@1 | R@5 | R@10 | Med r | Image Search R@1")
    assert lines[2] == "| DeFrag (demo) | 100.0 | 100.0 | 100.0 | 1 | 100.0 | 100.0 | 100.0 | 1 |"


def reference_scores(img_vecs, img_owner, n_images, sent_vecs, sent_owner, n_sents, smooth=10.0):
    """S_kl = sum over the pair's fragment dots of max(0, v.s) / (#fragments of sentence l + smooth)."""
    out = torch.zeros(n_images, n_sents)
    counts = torch.bincount(sent_owner, minlength=n_sents).float()
    dots = (img_vecs @ sent_vecs.T).clamp(min=0)
    for a in range(img_vecs.shape[0]):
        for b in range(sent_vecs.shape[0]):
            out[img_owner[a], sent_owner[b]] += dots[a, b]
    return out / (counts + smooth)[None, :]


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_score_matrix_chunks_agree_with_one_block(chunk):
    g = torch.Generator().manual_seed(0)
    n_images, n_sents, h = 7, 9, 6
    img_owner = torch.repeat_interleave(torch.arange(n_images), torch.randint(1, 5, (n_images,), generator=g))
    sent_owner = torch.repeat_interleave(torch.arange(n_sents), torch.randint(1, 4, (n_sents,), generator=g))
    img_vecs = torch.randn(len(img_owner), h, generator=g)
    sent_vecs = torch.randn(len(sent_owner), h, generator=g).relu()
    ref = reference_scores(img_vecs, img_owner, n_images, sent_vecs, sent_owner, n_sents)
    got = score_matrix(img_vecs, img_owner, n_images, sent_vecs, sent_owner, n_sents,
                       score_fn=reference_scores, images_per_chunk=chunk)
    torch.testing.assert_close(got, ref)
    perm = torch.randperm(len(img_owner), generator=g)  # fragments of an image need not be contiguous
    got = score_matrix(img_vecs[perm], img_owner[perm], n_images, sent_vecs, sent_owner, n_sents,
                       score_fn=reference_scores, images_per_chunk=chunk)
    torch.testing.assert_close(got, ref)


def test_score_matrix_uses_the_objective():
    from model import objective

    g = torch.Generator().manual_seed(1)
    img_owner = torch.arange(5).repeat_interleave(3)
    sent_owner = torch.arange(4).repeat_interleave(2)
    img_vecs, sent_vecs = torch.randn(15, 8, generator=g), torch.randn(8, 8, generator=g)
    full = objective.pair_scores(img_vecs, img_owner, 5, sent_vecs, sent_owner, 4)
    torch.testing.assert_close(score_matrix(img_vecs, img_owner, 5, sent_vecs, sent_owner, 4,
                                            images_per_chunk=2), full.float())
    torch.testing.assert_close(full.float(), reference_scores(img_vecs, img_owner, 5, sent_vecs, sent_owner, 4))


def standard_protocol(sims):
    """The field's evaluation as the VSE/SCAN ``i2t``/``t2i`` code computes it, written here from that protocol:
    sims is (N, 5N) with captions 5i..5i+4 belonging to image i; each query sorts its candidates by descending
    score (``argsort(...)[::-1]``), ranks are 0-based positions, R@K = 100 * mean(rank < K),
    medr = floor(median(rank)) + 1, meanr = mean(rank) + 1. Returns (annotation, search) as 5-tuples."""
    n = sims.shape[0]
    ann = np.zeros(n)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        ann[i] = min(np.where(order == j)[0][0] for j in range(5 * i, 5 * i + 5))
    search = np.zeros(5 * n)
    for j in range(5 * n):
        order = np.argsort(sims[:, j])[::-1]
        search[j] = np.where(order == j // 5)[0][0]

    def summary(r):
        return tuple(100.0 * np.mean(r < k) for k in (1, 5, 10)) + (np.floor(np.median(r)) + 1, r.mean() + 1)
    return summary(ann), summary(search)


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_the_standard_evaluation_protocol(seed):
    # Continuous scores (no ties, where the pessimistic rule and argsort agree) with weak signal, so the ranks
    # spread over 1..N; 38 images x 190 captions in the layout the standard code assumes (even counts, so a
    # median can fall between two ranks and the floor matters).
    rng = np.random.default_rng(seed)
    n = 38
    caption_image = np.repeat(np.arange(n), 5)
    sims = rng.normal(size=(n, 5 * n)) + 0.5 * (np.arange(n)[:, None] == caption_image[None, :])
    want_a, want_s = standard_protocol(sims)
    m = retrieval_metrics(sims, caption_image)
    for want, d in ((want_a, "annotation"), (want_s, "search")):
        got = tuple(100 * m[d][f"r{k}"] for k in (1, 5, 10)) + (m[d]["medr"], m[d]["meanr"])
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert 1 < m["search"]["medr"] < n  # not a degenerate all-first or all-last matrix
