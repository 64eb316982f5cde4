"""The planted benchmark: real Flickr8k captions, planted image side, the paper's ablation rows.

    OMP_NUM_THREADS=2 python benchmarks/bench_planted.py                  # CPU (parsing 40,000 captions first)
    python benchmarks/bench_planted.py --device cuda --epochs 15          # the same on a GPU

Text side: Flickr8k's captions (tests/data/flickr8k) through the project's parse stage (Luigi
ParseSentences + BuildVocab with the small Stanza models of tests/stanza_models, or --stanza-dir for real ones).
Image side, planted: every vocabulary word gets a random prototype in feature space; an image's regions are noisy
copies of the prototypes of the words its captions mention (the words most of its captions share first), plus
distractor regions and the whole-image fragment (model.planted.planted_regions). Trained on the 6,000 training
images (validation on --val-images of the dev split picks the best epoch), evaluated on the 1,000 test images
(5,000 captions), for the rows: global only; fragment only; fragment + MIL; fragment + global + MIL.

Held-out words (--held-out): why the original model keeps pretrained word vectors fixed. A planted set whose
words are real GloVe words (--word-vectors, default the packaged glove-6b-50d); the image side follows the vectors
(a concept's region prototype is a fixed random linear map of its vector); the test images show only concepts
that no training caption names. Side by side: W_e learned from random over the training words (the held-out
words are <unk> or untrained rows) vs the vectors' dictionary kept fixed, R@1/5/10 both ways on the test split.

    OMP_NUM_THREADS=2 python benchmarks/bench_planted.py --held-out
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "Global only": dict(use_fragment=False, use_global=True, use_mil=False),
    "Fragment only": dict(use_fragment=True, use_global=False, use_mil=False),
    "Fragment + MIL": dict(use_fragment=True, use_global=False, use_mil=True),
    "Fragment + Global + MIL": dict(use_fragment=True, use_global=True, use_mil=True),
}


def parse_flickr8k(dataset: str, cache_dir: Path, a) -> tuple[Path, Path]:
    """ParseSentences + BuildVocab through Luigi (nothing runs when the caches exist)."""
    import luigi

    import tasks

    models = ROOT / "tests" / "stanza_models"
    kw = dict(dataset=dataset, cache_dir=str(cache_dir), device="cpu", min_count=a.min_count)
    if a.stanza_dir:
        kw["stanza_dir"] = a.stanza_dir
    else:
        kw.update(stanza_tagger=str(models / "en_ewt_tagger_small.pt"),
                  stanza_parser=str(models / "en_ewt_parser_small.pt"))
    task = tasks.BuildVocab(**kw)
    t = time.time()
    if not luigi.build([task], local_scheduler=True, log_level="WARNING"):
        raise SystemExit("parsing failed: see the log above")
    print(f"parse stage: {time.time() - t:.0f} s (0 when cached) -> {task.triple_folder()}")
    return task.triple_folder(), Path(task.output().path)


def image_words(triple_folder: Path, vocab, per_image: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Vocabulary words each image's captions mention, most shared among its captions first (ties at random)."""
    from pipeline.cache import list_shards, read_triple_shard

    count: dict[str, Counter] = {}
    for path in list_shards(triple_folder):
        b = read_triple_shard(path)
        for m, img in enumerate(b.image_ids):
            lo, hi = int(b.offsets[m]), int(b.offsets[m + 1])
            ws = {vocab.word_id(w) for w in b.head[lo:hi] + b.dep[lo:hi]} - {0}
            count.setdefault(img, Counter()).update(ws)
    out = {}
    for img, c in count.items():
        words = list(c)
        keys = [(-c[w], rng.random()) for w in words]
        out[img] = [w for _, w in sorted(zip(keys, words))][:per_image]
    return out


HELD_OUT_FILLERS = ["a", "the", "one", "some", "this", "that", "there", "here", "very", "just"]


def held_out_words(a) -> None:
    """Learned random W_e vs fixed vectors on a planted set whose test images show only unseen words."""
    import torch

    from model.checkpoint import load_model
    from model.evaluate import metrics_table, retrieval_metrics, score_matrix
    from model.planted import synthetic_set, train_caption_ids, write_caches
    from model.store import FragmentStore, encode
    from model.train import TrainConfig, train
    from model.wordvecs import build_vector_vocab, open_source, read_vectors
    from pipeline.vocab import load_vocab

    if a.threads:
        torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    src = open_source(a.word_vectors)
    keys, rows, _ = read_vectors(src)
    # concepts: plain lowercase words of middling frequency (ranks 1,000-20,000), drawn at random
    pool = [i for i in range(1000, min(20000, len(keys))) if keys[i].isalpha() and keys[i] not in HELD_OUT_FILLERS]
    pick = rng.choice(pool, a.concepts, replace=False)
    concepts = [keys[i] for i in pick]
    root = Path(a.cache_dir) / f"held-out-{a.concepts}-{a.held_out_concepts}-{a.images}-s{a.seed}"
    ps = synthetic_set(a.images, n_concepts=a.concepts, held_out=a.held_out_concepts, concepts_per_image=3,
                       feat_dim=a.dim, noise=a.noise, n_distractors=a.distractors, val_fraction=0.1,
                       test_fraction=0.2, seed=a.seed, concept_vectors=rows[pick], concept_words=concepts,
                       filler_words=HELD_OUT_FILLERS)
    reg, tri, counted_path = write_caches(root, ps)
    counted = load_vocab(counted_path)
    fixed = build_vector_vocab(tri, train_caption_ids(ps), a.word_vectors, root / "vectors" / "vocab.json")
    held = concepts[-a.held_out_concepts:]
    print(f"planted held-out set: {a.images} images ({a.concepts - a.held_out_concepts} training concepts; the "
          f"{sum(s == 'test' for s in ps.splits.values())} test images show only the {a.held_out_concepts} others, "
          f"e.g. {', '.join(held[:5])}), vectors {a.word_vectors} ({src.dim}-d)")
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    results, times = {}, {}
    rows_ = {f"Learned random W_e (training words, d {src.dim})": counted,
             f"Fixed {a.word_vectors} (the vectors' dictionary)": fixed}
    for name, vocab in rows_.items():
        store = FragmentStore(reg, tri, vocab, ps.splits)
        unseen = sum(1 for w in held if vocab.word_id(w) == 0)
        cfg = TrainConfig(epochs=a.epochs, h=a.h, d=src.dim, lr=a.lr, optimizer="adam", batch_size=100, seed=a.seed,
                          device=str(device), progress=False)
        t = time.time()
        summary = train(cfg, reg, tri, vocab, root / "runs", store=store, resume=True)
        times[name] = time.time() - t
        model, _ = load_model(summary["run_dir"], device)
        test = store.split("test")
        iv, io, sv, so = encode(model, test, device)
        scores = score_matrix(iv, io, test.n_images, sv, so, test.n_captions, smooth=cfg.smooth)
        results[name] = retrieval_metrics(scores, test.caption_image.cpu())
        print(f"{name}: {len(vocab.words)} words ({unseen} of the {len(held)} held-out words are <unk>), "
              f"{times[name]:.0f} s")
    n_test = sum(s == "test" for s in ps.splits.values())
    print(f"\nHeld-out words: {n_test} test images x 5 captions whose concept words no training caption uses "
          f"(D {a.dim}, noise {a.noise}, h {a.h}, {a.epochs} epochs, Adam lr {a.lr}, {device}):\n")
    print(metrics_table(results))
    (root / "results.json").write_text(json.dumps({"args": vars(a), "results": results, "seconds": times}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "flickr8k"))
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "defrag-bench-planted"))
    ap.add_argument("--stanza-dir", default="", help="real Stanza models instead of the project's small ones")
    ap.add_argument("--triples", default="", help="an existing triple cache folder (skips the parse stage; with --vocab)")
    ap.add_argument("--vocab", default="", help="its vocab.json")
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256, help="planted feature size D")
    ap.add_argument("--noise", type=float, default=1.0, help="region noise (prototypes have unit variance)")
    ap.add_argument("--words-per-image", type=int, default=12)
    ap.add_argument("--distractors", type=int, default=4)
    ap.add_argument("--val-images", type=int, default=250, help="dev images used to pick the best epoch")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    ap.add_argument("--held-out", action="store_true", help="learned random W_e vs fixed word vectors on words no "
                    "training caption uses (a planted set of real words; ignores the Flickr8k options)")
    ap.add_argument("--word-vectors", default="glove-6b-50d", help="--held-out: the vectors (name or file)")
    ap.add_argument("--images", type=int, default=1000, help="--held-out: images (10%% val, 20%% test)")
    ap.add_argument("--concepts", type=int, default=300, help="--held-out: concept words")
    ap.add_argument("--held-out-concepts", type=int, default=60, help="--held-out: concepts only test images show")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.held_out:
        return held_out_words(a)

    import torch

    from data import load_dataset
    from model.checkpoint import load_model
    from model.evaluate import metrics_table, retrieval_metrics, score_matrix
    from model.objective import pair_scores
    from model.planted import planted_regions
    from model.store import FragmentStore, encode
    from model.train import TrainConfig, train
    from pipeline.cache import K_FRAGMENTS, shard_ranges, write_region_shard
    from pipeline.vocab import load_vocab

    if a.threads:
        torch.set_num_threads(a.threads)
    cache = Path(a.cache_dir)
    data = load_dataset(a.dataset)
    if a.triples and a.vocab:  # e.g. on a GPU machine without Stanza: caches parsed elsewhere
        triple_folder, vocab_path = Path(a.triples), Path(a.vocab)
    else:
        triple_folder, vocab_path = parse_flickr8k(a.dataset, cache, a)
    vocab = load_vocab(vocab_path)

    rng = np.random.default_rng(a.seed)
    reg = cache / "regions" / f"planted-d{a.dim}-n{a.noise}-w{a.words_per_image}-x{a.distractors}-s{a.seed}"
    if not (reg / "done").exists():
        words = image_words(triple_folder, vocab, a.words_per_image, rng)
        protos = rng.standard_normal((len(vocab.words), a.dim))
        ids = [im.image_id for im in data.images]
        feats, mask = planted_regions([words.get(i, []) for i in ids], protos, rng, noise=a.noise,
                                      n_distractors=a.distractors)
        ranges = shard_ranges(len(ids), 1000)
        for s, (lo, hi) in enumerate(ranges):
            write_region_shard(reg / f"shard-{s:05d}.h5", image_ids=ids[lo:hi], image_hw=np.full((hi - lo, 2), 500),
                               boxes=np.zeros((hi - lo, K_FRAGMENTS, 4)), scores=mask[lo:hi].astype(np.float32),
                               labels=np.where(mask[lo:hi], 1, -1), mask=mask[lo:hi], features=feats[lo:hi],
                               producer={"backend": "planted", "dim": a.dim}, dataset=data.describe(),
                               shard_index=s, num_shards=len(ranges))
        (reg / "done").write_text("ok\n")
    val_keep = {im.image_id for im in data.split_images("val")[:a.val_images]}
    splits = {im.image_id: im.split for im in data.images if im.split != "val" or im.image_id in val_keep}
    store = FragmentStore(reg, triple_folder, vocab, splits)
    d = store.describe()
    print(f"store: {d['train_images']} train / {d['val_images']} val / {d['test_images']} test images, "
          f"{d['captions']} captions, {d['triples']} triples, {store.n_words} words, {store.n_relations} relations")

    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    test = store.split("test")
    results, times = {}, {}
    runs = cache / "runs"
    for name in a.rows.split(","):
        cfg = TrainConfig(epochs=a.epochs, h=a.h, d=a.d, lr=a.lr, seed=a.seed, device=str(device), progress=False,
                          **ROWS[name])
        t = time.time()
        summary = train(cfg, reg, triple_folder, vocab_path, runs, store=store, resume=True)
        times[name] = time.time() - t
        model, ckpt = load_model(summary["run_dir"], device)
        iv, io, sv, so = encode(model, test, device)
        scores = score_matrix(iv, io, test.n_images, sv, so, test.n_captions, score_fn=pair_scores,
                              smooth=cfg.smooth, threshold=cfg.threshold_global)
        results[name] = retrieval_metrics(scores, test.caption_image.cpu())
        best = ckpt["best"]
        print(f"{name}: best epoch {best['epoch']} (val rsum {best['val']['rsum']:.1f}), "
              f"test rsum {100 * sum(results[name][k][f'r{r}'] for k in ('annotation', 'search') for r in (1, 5, 10)):.1f}"
              f", {times[name]:.0f} s")
    print(f"\nPlanted Flickr8K, 1,000 test images x 5 captions (D {a.dim}, noise {a.noise}, h {a.h}, d {a.d}, "
          f"{a.epochs} epochs, {device}):\n")
    print(metrics_table(results))
    (cache / "results.json").write_text(json.dumps({"args": vars(a), "results": results, "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
