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
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

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
