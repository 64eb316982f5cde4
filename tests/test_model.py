"""The DeFrag model, word vectors, the fragment store (over real cache shards) and the batch sampler."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from model.batches import epoch_batches
from model.defrag import DeFrag
from model.planted import synthetic_set, write_caches
from model.store import FragmentStore, encode
from pipeline.cache import CacheError, open_shard, read_region_shard, shard_info, write_region_shard
from pipeline.vocab import load_vocab


# ---------------------------------------------------------------------------------------------- model

def test_sentence_fragments_match_per_triple_formula():
    torch.manual_seed(0)
    m = DeFrag(feat_dim=5, n_words=9, n_relations=4, h=6, d=3).double()
    rel = torch.tensor([2, 0, 2, 3, 1, 0, 2])
    w1 = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    w2 = torch.tensor([8, 7, 6, 5, 4, 3, 0])
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    s, o = m.sentence_fragments(rel, w1, w2, owner)
    for t in range(len(rel)):  # s = ReLU(W_R [W_e w1; W_e w2] + b_R), one W_R per relation
        e = torch.cat([m.words.weight[w1[t]], m.words.weight[w2[t]]])
        ref = torch.relu(m.rel_weight[rel[t]] @ e + m.rel_bias[rel[t]])
        torch.testing.assert_close(s[t], ref)
    assert torch.equal(o, owner)
    # the batched path (padded bmm, the CUDA default) gives the same values and gradients as the loop
    s.pow(2).sum().backward()
    params = [m.words.weight, m.rel_weight, m.rel_bias]
    grads = [p.grad.clone() for p in params]
    m.zero_grad()
    m.relation_batched = True
    s2, _ = m.sentence_fragments(rel, w1, w2, owner)
    torch.testing.assert_close(s2, s)
    s2.pow(2).sum().backward()
    for g, p in zip(grads, params):
        torch.testing.assert_close(p.grad, g)
    assert float(m.rel_weight.grad[1].abs().sum()) > 0  # relation 1 is used once: it gets a gradient


def test_shared_relation_uses_one_matrix():
    m = DeFrag(feat_dim=5, n_words=9, n_relations=4, h=6, d=3, shared_relation=True)
    assert m.rel_weight.shape == (1, 6, 6)
    rel = torch.tensor([0, 3])
    s1, _ = m.sentence_fragments(rel, torch.tensor([1, 1]), torch.tensor([2, 2]), torch.tensor([0, 1]))
    torch.testing.assert_close(s1[0], s1[1])  # the relation type does not matter


def test_masked_rows_never_take_part():
    m = DeFrag(feat_dim=4, n_words=3, n_relations=1, h=5, d=2)
    feats = torch.randn(2, 20, 4).half()
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, [0, 5]] = True
    v, owner = m.image_fragments(feats, mask)
    assert v.shape == (5, 5) and owner.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(v[4], m.image_proj(feats[1, 5].float()))
    feats2 = feats.clone()
    feats2[~mask] = float("nan")  # whatever padding holds never reaches the output
    v2, _ = m.image_fragments(feats2, mask)
    assert torch.equal(v, v2)


# ---------------------------------------------------------------------------------------------- store

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    ps = synthetic_set(30, feat_dim=8, concepts_per_image=2, n_concepts=10, val_fraction=0.3, test_fraction=0.1,
                       seed=1)
    reg, tri, voc = write_caches(root, ps, image_shard=7, caption_shard=40)
    return ps, reg, tri, voc


def test_store_reads_caches_into_tensors(planted):
    ps, reg, tri, voc = planted
    st = FragmentStore(reg, tri, voc, ps.splits)
    vocab = load_vocab(voc)
    assert st.features.feats.dtype == torch.float16 and st.features.feats.shape == (30, 20, 8)
    assert {n: s.n_images for n, s in st.splits.items()} == {"train": 18, "val": 9, "test": 3}
    tr = st.split("train")
    assert tr.n_captions == 90
    # a ragged gather of captions equals the triples written, mapped through the vocabulary
    idx = torch.tensor([5, 0, 17])
    rel, w1, w2, owner = tr.triples(idx)
    want = []
    for b, m in enumerate(idx.tolist()):
        g = ps.caption_ids.index(tr.caption_ids[m])
        want += [(vocab.rel_id(t[0]), vocab.word_id(t[1]), vocab.word_id(t[2]), b) for t in ps.triples[g]]
    assert list(zip(rel.tolist(), w1.tolist(), w2.tolist(), owner.tolist())) == want
    # images: features and masks as written, caption -> image consistent
    feats, mask = tr.images(torch.tensor([3]))
    i = ps.image_ids.index(tr.image_ids[3])
    assert np.array_equal(feats[0].numpy(), ps.features[i]) and np.array_equal(mask[0].numpy(), ps.mask[i])
    cap_img = [tr.image_ids[j] for j in tr.caption_image.tolist()]
    assert cap_img == [ps.caption_images[ps.caption_ids.index(c)] for c in tr.caption_ids]
    sub = tr.subset([4, 2])
    assert sub.image_ids == [tr.image_ids[4], tr.image_ids[2]] and sub.n_captions == 10
    assert all(sub.image_ids[k] == ps.caption_images[ps.caption_ids.index(c)]
               for c, k in zip(sub.caption_ids, sub.caption_image.tolist()))


def _rewrite_region_shard(path, drop: list[int], **changes):
    """Rewrite a region shard without the images at ``drop`` (recorded as failed), keeping its attributes."""
    blk = read_region_shard(path)
    with open_shard(path, "regions") as f:
        info = shard_info(f)
    keep = [i for i in range(len(blk.image_ids)) if i not in drop]
    attrs = dict(producer=info.producer, dataset=info.dataset, shard_index=info.shard_index,
                 num_shards=info.num_shards)
    attrs.update(changes)
    write_region_shard(path, image_ids=[blk.image_ids[i] for i in keep], image_hw=blk.image_hw[keep],
                       boxes=blk.boxes[keep], scores=blk.scores[keep], labels=blk.labels[keep], mask=blk.mask[keep],
                       features=blk.features[keep], failed_ids=[blk.image_ids[i] for i in drop],
                       failed_reasons=["unreadable"] * len(drop), **attrs)
    return [blk.image_ids[i] for i in drop]


def _store_triples(st: FragmentStore) -> dict[str, list[tuple[str, str, str]]]:
    """caption id -> its triples as strings, read back from the store's flat tensors and offsets."""
    v = st.vocab
    out = {}
    for m, cid in enumerate(st.caption_ids):
        a, b = int(st.offsets[m]), int(st.offsets[m + 1])
        out[cid] = [(v.relations[r], v.words[h], v.words[d])
                    for r, h, d in zip(st.rel[a:b].tolist(), st.w1[a:b].tolist(), st.w2[a:b].tolist())]
    return out


def test_store_drops_failed_images_of_a_middle_shard_keeping_every_captions_triples(planted, tmp_path, caplog):
    ps, reg, tri, voc = planted
    import shutil

    reg2 = tmp_path / "regions" / reg.name
    shutil.copytree(reg, reg2)
    middle = sorted(reg2.glob("shard-*.h5"))[2]  # images 14..20 of 30: captions after them must stay aligned
    gone = _rewrite_region_shard(middle, drop=[1, 3])
    with caplog.at_level(logging.WARNING):
        st = FragmentStore(reg2, tri, voc, ps.splits)
    assert "2 images failed region extraction" in caplog.text and "10 captions dropped" in caplog.text
    assert len(st.caption_ids) == 140 and not set(gone) & set(st.image_ids)
    want = {c: [t[:3] for t in ts] for c, ts in zip(ps.caption_ids, ps.triples)}  # the vocabulary holds them all
    got = _store_triples(st)
    assert set(got) == {c for c, i in zip(ps.caption_ids, ps.caption_images) if i not in gone}
    assert all(got[c] == want[c] for c in got), [c for c in got if got[c] != want[c]][:5]
    # and each caption still points at its own image, whose features are the ones written
    for m in (0, 75, 139):
        cid = st.caption_ids[m]
        img = st.image_ids[int(st.caption_image[m])]
        assert img == ps.caption_images[ps.caption_ids.index(cid)]
        assert np.array_equal(st.features.get(st.caption_image[m:m + 1])[0].numpy(),
                              ps.features[ps.image_ids.index(img)])


def test_store_refuses_shards_of_another_producer(planted, tmp_path):
    ps, reg, tri, voc = planted
    import shutil

    reg2 = tmp_path / "regions" / reg.name
    shutil.copytree(reg, reg2)
    with open_shard(reg / "shard-00000.h5", "regions") as f:
        producer = shard_info(f).producer
    # the producer the shards carry is accepted; another one (other weights) is refused, naming both
    assert len(FragmentStore(reg2, tri, voc, ps.splits, producers={"regions": producer}).image_ids) == 30
    other = {**producer, "weights": "random"}
    with pytest.raises(CacheError, match=r"shard-00000.h5 has producer .*planted.*this run asks for.*random"):
        FragmentStore(reg2, tri, voc, ps.splits, producers={"regions": other})
    with pytest.raises(CacheError, match=r"triple shard .* has producer"):
        FragmentStore(reg2, tri, voc, ps.splits, producers={"triples": {"parser": "other"}})
    # one shard of the folder written by other weights: refused even when the caller names no producer
    _rewrite_region_shard(sorted(reg2.glob("shard-*.h5"))[3], drop=[], producer=other)
    with pytest.raises(CacheError, match=r"shard-00003.h5 has producer .*random.*shard-00000.h5 has"):
        FragmentStore(reg2, tri, voc, ps.splits)


def test_store_maps_unknown_words_or_skips_them(planted):
    ps, reg, tri, voc = planted
    # a vocabulary without one word: its triples map to <unk>, or are skipped with skip_unknown
    vocab = load_vocab(voc)
    gone = vocab.words[1]
    vocab.words = [w for w in vocab.words if w != gone]
    vocab.word_counts = vocab.word_counts[:len(vocab.words)]
    n_gone = sum(1 for ts in ps.triples for t in ts if gone in (t[1], t[2]))
    full = FragmentStore(reg, tri, vocab, ps.splits)
    skip = FragmentStore(reg, tri, vocab, ps.splits, skip_unknown=True)
    assert int(((full.w1 == 0) | (full.w2 == 0)).sum()) == n_gone > 0
    assert skip.rel.numel() == full.rel.numel() - n_gone and int((skip.w1 == 0).sum() + (skip.w2 == 0).sum()) == 0
    # skipped triples leave every other caption's triples in place
    want = {c: [t[:3] for t in ts if gone not in (t[1], t[2])] for c, ts in zip(ps.caption_ids, ps.triples)}
    assert _store_triples(skip) == want
    # a relation outside the vocabulary: <unk> relation, or skipped with the rest of the unknowns
    vocab = load_vocab(voc)
    rel = vocab.relations[2]
    vocab.relations = [r for r in vocab.relations if r != rel]
    vocab.relation_counts = vocab.relation_counts[:len(vocab.relations)]
    full, skip = (FragmentStore(reg, tri, vocab, ps.splits, skip_unknown=k) for k in (False, True))
    n_rel = sum(1 for ts in ps.triples for t in ts if t[0] == rel)
    assert int((full.rel == 0).sum()) == n_rel > 0 and full.rel.numel() == skip.rel.numel() + n_rel
    assert _store_triples(full)[ps.caption_ids[0]] == [("<unk>" if t[0] == rel else t[0], t[1], t[2])
                                                       for t in ps.triples[0]]


@pytest.mark.parametrize("stream", ["shards", "rows"])
def test_streaming_store_matches_memory(planted, stream):
    ps, reg, tri, voc = planted
    mem = FragmentStore(reg, tri, voc, ps.splits)
    shard_bytes = 7 * 20 * 8 * 2
    stream = FragmentStore(reg, tri, voc, ps.splits, memory_budget_bytes=2 * shard_bytes, stream=stream)
    assert stream.streaming and not mem.streaming
    feats = stream.features
    feats.max_open = 2
    for name, idx in (("train", [0, 17, 3, 9, 12, 3]), ("val", [8, 0, 4])):  # unsorted, a row twice
        a, b = mem.split(name).images(torch.tensor(idx)), stream.split(name).images(torch.tensor(idx))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if feats.by_rows:  # rows read one by one from at most max_open open shards; no shard is held in memory
        assert not feats.cache and 0 < len(feats.files) <= 2 and feats.loads == 9
        feats.close()
        assert not feats.files and torch.equal(stream.split("val").images(torch.tensor([1]))[0],
                                               mem.split("val").images(torch.tensor([1]))[0])
        return
    assert len(feats.cache) <= 2  # the LRU never holds more than the budget
    # least recently used goes first: shards 0, 1, 0, 2 leave {0, 2}; shard 0 is not read again, shard 1 is
    lru = FragmentStore(reg, tri, voc, ps.splits, memory_budget_bytes=2 * shard_bytes, stream="shards").features
    for s in (0, 1, 0, 2, 0):
        lru._shard(s)
    assert list(lru.cache) == [2, 0] and lru.loads == 3
    lru._shard(1)
    assert list(lru.cache) == [0, 1] and lru.loads == 4
    torch.manual_seed(0)
    m = DeFrag(8, len(load_vocab(voc).words), len(load_vocab(voc).relations), h=6, d=4)
    for x, y in zip(encode(m, mem.split("val"), "cpu", batch=4), encode(m, stream.split("val"), "cpu", batch=4)):
        assert torch.equal(x, y)


def test_stream_modes(planted, monkeypatch):
    import model.store as store_module

    ps, reg, tri, voc = planted
    small = dict(memory_budget_bytes=100)
    assert FragmentStore(reg, tri, voc, ps.splits, stream="rows", **small).features.by_rows
    assert not FragmentStore(reg, tri, voc, ps.splits, stream="shards", **small).features.by_rows
    assert FragmentStore(reg, tri, voc, ps.splits, **small).features.by_rows  # auto: the files fit this machine
    monkeypatch.setattr(store_module, "available_memory", lambda: 1000)  # a machine the files do not fit
    assert not FragmentStore(reg, tri, voc, ps.splits, **small).features.by_rows
    with pytest.raises(ValueError, match="stream must be one of auto, rows, shards, got 'row'"):
        FragmentStore(reg, tri, voc, ps.splits, stream="row")


def test_encode_matches_the_model_image_by_image_and_caption_by_caption(planted):
    ps, reg, tri, voc = planted
    st = FragmentStore(reg, tri, voc, ps.splits)
    v = load_vocab(voc)
    torch.manual_seed(0)
    m = DeFrag(8, len(v.words), len(v.relations), h=6, d=4)
    val = st.split("val")
    iv, io, sv, so = encode(m, val, batch=4)  # chunks of 4 across 9 images and 45 captions
    with torch.no_grad():
        for k, iid in enumerate(val.image_ids):  # image k's real rows, in row order, owned by k
            i = ps.image_ids.index(iid)
            rows = torch.from_numpy(ps.features[i][ps.mask[i]]).float()
            torch.testing.assert_close(iv[io == k], m.image_proj(rows))
        for c, cid in enumerate(val.caption_ids):  # caption c's triples through the model, owned by c
            ts = ps.triples[ps.caption_ids.index(cid)]
            ids = [torch.tensor(x) for x in zip(*[(v.rel_id(t[0]), v.word_id(t[1]), v.word_id(t[2])) for t in ts])]
            ref, _ = m.sentence_fragments(*ids, torch.zeros(len(ts), dtype=torch.long))
            torch.testing.assert_close(sv[so == c], ref)
    assert len(io) == int(ps.mask[[ps.image_ids.index(i) for i in val.image_ids]].sum())
    assert len(so) == 3 * val.n_captions


# ---------------------------------------------------------------------------------------------- batches

def test_batches_never_repeat_an_image_and_cover_every_caption():
    g = torch.Generator().manual_seed(0)
    cap_img = torch.tensor(np.random.default_rng(0).integers(0, 57, 400))  # uneven captions per image
    batches = epoch_batches(cap_img, 16, g)
    allc = torch.cat(batches)
    assert sorted(allc.tolist()) == list(range(400))
    for b in batches:
        assert len(b) <= 16 and len(set(cap_img[b].tolist())) == len(b)
    again = epoch_batches(cap_img, 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    groups = [torch.arange(0, 200), torch.arange(200, 400)]
    gb = epoch_batches(cap_img, 16, torch.Generator().manual_seed(1), groups)
    seen_second = False
    for b in gb:  # groups in order, never mixed
        first = bool((b < 200).all())
        assert first or bool((b >= 200).all())
        seen_second |= not first
        assert not (first and seen_second)
