"""A small trained run on the demo set, built with the real cache writers, store and trainer in seconds.

Region features are random (16-d) and the triples come from a word-pair rule instead of Stanza, so the run
exercises evaluation, retrieval and reports without the detector or the parser (tests/test_end_to_end.py runs
those). Image boxes are random but inside each image.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from data import load_dataset
from pipeline.cache import K_FRAGMENTS, cache_folder, shard_name, write_region_shard, write_triple_shard
from pipeline.triples import Triple
from pipeline.vocab import save_vocab, vocab_from_cache

FEAT_DIM = 16


def rule_triples(text: str) -> list[Triple]:
    """(nn, word, previous word) for each adjacent pair of words: a stand-in for parsed triples."""
    words = re.findall(r"[a-z]+", text.lower())
    return [Triple("nn" if i % 2 else "amod", words[i], words[i - 1], words[i], words[i - 1], i + 1, i)
            for i in range(1, len(words))]


def build_small_run(root: Path, epochs: int = 2, seed: int = 0) -> Path:
    from model.runs import write_dataset_reference
    from model.train import train

    ds = load_dataset("demo")
    rng = np.random.default_rng(seed)
    n = len(ds.images)
    hw = np.array([Image.open(ds.image_path(im.image_id)).size[::-1] for im in ds.images])
    boxes = np.zeros((n, K_FRAGMENTS, 4), np.float32)
    mask = np.zeros((n, K_FRAGMENTS), bool)
    for k, (h, w) in enumerate(hw):
        boxes[k, 0] = [0, 0, w, h]
        m = int(rng.integers(3, K_FRAGMENTS))
        mask[k, :m] = True
        x0, y0 = rng.uniform(0, 0.6 * w, m - 1), rng.uniform(0, 0.6 * h, m - 1)
        boxes[k, 1:m] = np.stack([x0, y0, x0 + rng.uniform(0.1, 0.4) * w, y0 + rng.uniform(0.1, 0.4) * h], 1)
    feats = rng.normal(size=(n, K_FRAGMENTS, FEAT_DIM)).astype(np.float16) * mask[..., None]
    producer_r = {"backend": "random-test-features", "dim": FEAT_DIM}
    reg = cache_folder(root / "cache", "regions", "demo", {"producer": producer_r, "dataset": ds.describe()})
    write_region_shard(reg / shard_name(0), image_ids=[im.image_id for im in ds.images], image_hw=hw, boxes=boxes,
                       scores=mask.astype(np.float32), labels=np.where(mask, 1, -1), mask=mask, features=feats,
                       producer=producer_r, dataset=ds.describe(), shard_index=0, num_shards=1)
    producer_t = {"parser": "word-pairs-test"}
    tri = cache_folder(root / "cache", "triples", "demo", {"producer": producer_t, "dataset": ds.describe()})
    caps = ds.captions
    write_triple_shard(tri / shard_name(0), caption_ids=[c.caption_id for c in caps],
                       image_ids=[c.image_id for c in caps], texts=[c.text for c in caps],
                       triples=[rule_triples(c.text) for c in caps], producer=producer_t, dataset=ds.describe(),
                       shard_index=0, num_shards=1)
    vocab_path = save_vocab(vocab_from_cache(tri, {c.caption_id for c in ds.split_captions("train")}, 1),
                            root / "cache" / "vocab.json")
    summary = train({"epochs": epochs, "batch_size": 8, "h": 16, "d": 8, "lr": 0.01, "device": "cpu",
                     "progress": False, "seed": seed}, reg, tri, vocab_path, root / "runs",
                    splits={im.image_id: im.split for im in ds.images})
    run = Path(summary["run_dir"])
    write_dataset_reference(run, "demo")
    return run
