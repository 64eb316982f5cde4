"""Planted data: region and triple caches whose image-sentence correspondence is known by construction.

Each word that can be "seen" has a random prototype in feature space; an image's region features are noisy
copies of the prototypes of words its captions mention, plus distractor regions (pure noise) and the whole-image
fragment (row 0: the mean of its regions plus noise). A model that learns anything real aligns a word's
triples with its prototype's regions; chance stays chance. Tests and benchmarks write their caches with it
through the real cache writers (pipeline.cache), so the trainer reads exactly what stage 1 would write.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.cache import K_FRAGMENTS, WHOLE_IMAGE_ROW, cache_key, shard_ranges, write_region_shard, write_triple_shard
from pipeline.vocab import Vocab, build_vocab, save_vocab


def planted_regions(image_words: Sequence[Sequence[int]], prototypes: np.ndarray, rng: np.random.Generator, *,
                    noise: float = 0.5, n_distractors: int = 4, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, K, D) and mask (N, K) of images showing the words ``image_words[i]`` (prototype rows).

    Rows 1.. hold up to K - 1 - n_distractors word regions, then distractors; the rest is padding (masked).
    """
    n, dim = len(image_words), prototypes.shape[1]
    feats = np.zeros((n, K_FRAGMENTS, dim), dtype)
    mask = np.zeros((n, K_FRAGMENTS), bool)
    per = K_FRAGMENTS - 1 - n_distractors
    for i, words in enumerate(image_words):
        w = np.asarray(list(words)[:per], np.int64)
        rows = prototypes[w] + noise * rng.standard_normal((len(w), dim))
        rows = np.concatenate([rows, rng.standard_normal((n_distractors, dim))])  # distractors: no word
        whole = rows.mean(0) + noise * rng.standard_normal(dim)
        feats[i, WHOLE_IMAGE_ROW] = whole
        feats[i, 1:1 + len(rows)] = rows
        mask[i, :1 + len(rows)] = True
    return feats, mask


@dataclass
class PlantedSet:
    image_ids: list[str]
    splits: dict[str, str]  # image id -> split
    features: np.ndarray  # (N, K, D)
    mask: np.ndarray  # (N, K)
    caption_ids: list[str]
    caption_images: list[str]
    texts: list[str]
    triples: list[list[tuple]]  # per caption: (rel, head, dep, head_lemma, dep_lemma, head_pos, dep_pos)


def synthetic_set(n_images: int, *, captions_per_image: int = 5, n_concepts: int = 40, concepts_per_image: int = 3,
                  triples_per_caption: int = 3, n_fillers: int = 10, feat_dim: int = 32, noise: float = 0.5,
                  n_distractors: int = 4, val_fraction: float = 0.2, test_fraction: float = 0.0,
                  seed: int = 0, held_out: int = 0, concept_vectors: np.ndarray | None = None,
                  concept_words: Sequence[str] | None = None, filler_words: Sequence[str] | None = None) -> PlantedSet:
    """A fully synthetic planted set: each image shows ``concepts_per_image`` concepts; each caption holds
    triples (rel, concept, filler) about some of them, fillers being words with no image signal.

    ``held_out``: the last ``held_out`` concepts are shown only by the test images (which show nothing else),
    so their words occur in no training caption. ``concept_vectors`` (n_concepts, d): the image side follows
    word vectors: a concept's prototype is a fixed random linear map of its vector, so a model that maps vectors
    to regions generalises to concepts it never saw. ``concept_words``/``filler_words``: real words to use.
    """
    rng = np.random.default_rng(seed)
    concepts = list(concept_words) if concept_words is not None else [f"c{j}" for j in range(n_concepts)]
    fillers = list(filler_words) if filler_words is not None else [f"f{j}" for j in range(n_fillers)]
    n_concepts, n_fillers = len(concepts), len(fillers)
    relations = ["amod", "det", "nsubj", "obj"]
    if concept_vectors is None:
        protos = rng.standard_normal((n_concepts, feat_dim))
    else:
        protos = np.asarray(concept_vectors, np.float64) @ rng.standard_normal((concept_vectors.shape[1], feat_dim))
        protos /= protos.std(axis=1, keepdims=True)  # unit variance per prototype, like the random ones
    image_ids = [f"img{i:05d}" for i in range(n_images)]
    n_val, n_test = int(round(val_fraction * n_images)), int(round(test_fraction * n_images))
    split_of = ["val"] * n_val + ["test"] * n_test + ["train"] * (n_images - n_val - n_test)
    if held_out:
        if not 0 < held_out <= n_concepts - concepts_per_image or held_out < concepts_per_image or not n_test:
            raise ValueError(f"held_out={held_out} needs test images and at least concepts_per_image="
                             f"{concepts_per_image} concepts on each side of {n_concepts}")
        seen = n_concepts - held_out
        shown = [seen + rng.choice(held_out, concepts_per_image, replace=False) if sp == "test"
                 else rng.choice(seen, concepts_per_image, replace=False) for sp in split_of]
    else:
        shown = [rng.choice(n_concepts, concepts_per_image, replace=False) for _ in range(n_images)]
    feats, mask = planted_regions(shown, protos, rng, noise=noise, n_distractors=n_distractors)
    cap_ids, cap_imgs, texts, triples = [], [], [], []
    for i, img in enumerate(image_ids):
        for c in range(captions_per_image):
            ts = []
            for t in range(triples_per_caption):
                concept = concepts[int(rng.choice(shown[i]))]
                filler = fillers[int(rng.integers(n_fillers))]
                rel = relations[int(rng.integers(len(relations)))]
                head, dep = (concept, filler) if rel in ("amod", "det") else (filler, concept)
                ts.append((rel, head, dep, head, dep, 2 * t + 1, 2 * t + 2))
            cap_ids.append(f"{img}#{c}")
            cap_imgs.append(img)
            texts.append(" ".join(f"{h} {d}" for _, h, d, *_ in ts))
            triples.append(ts)
    return PlantedSet(image_ids, dict(zip(image_ids, split_of)), feats, mask, cap_ids, cap_imgs, texts, triples)


def write_caches(root: str | Path, ps: PlantedSet, *, image_shard: int = 50, caption_shard: int = 250,
                 dataset_name: str = "planted") -> tuple[Path, Path, Path]:
    """Write region shards, triple shards and vocab.json under ``root``; return their three paths."""
    root = Path(root)
    dataset = {"name": dataset_name, "identity": cache_key({"ids": ps.image_ids, "caps": ps.caption_ids})}
    producer = {"backend": "planted", "feature_dim": int(ps.features.shape[2])}
    reg = root / "regions" / f"{dataset_name}-{cache_key({'p': producer, 'd': dataset})}"
    tri = root / "triples" / f"{dataset_name}-{cache_key({'p': 'planted', 'd': dataset})}"
    n = len(ps.image_ids)
    ranges = shard_ranges(n, image_shard)
    for s, (a, b) in enumerate(ranges):
        boxes = np.zeros((b - a, K_FRAGMENTS, 4), np.float32)
        scores = ps.mask[a:b].astype(np.float32)
        labels = np.where(ps.mask[a:b], 1, -1).astype(np.int32)
        write_region_shard(reg / f"shard-{s:05d}.h5", image_ids=ps.image_ids[a:b],
                           image_hw=np.full((b - a, 2), 100, np.int32), boxes=boxes, scores=scores, labels=labels,
                           mask=ps.mask[a:b], features=ps.features[a:b], producer=producer, dataset=dataset,
                           shard_index=s, num_shards=len(ranges))
    m = len(ps.caption_ids)
    ranges = shard_ranges(m, caption_shard)
    for s, (a, b) in enumerate(ranges):
        write_triple_shard(tri / f"shard-{s:05d}.h5", caption_ids=ps.caption_ids[a:b],
                           image_ids=ps.caption_images[a:b], texts=ps.texts[a:b], triples=ps.triples[a:b],
                           producer={"parser": "planted"}, dataset=dataset, shard_index=s, num_shards=len(ranges))
    return reg, tri, save_vocab(planted_vocab(ps), root / "vocab.json")


def train_caption_ids(ps: PlantedSet) -> set[str]:
    return {c for c, i in zip(ps.caption_ids, ps.caption_images) if ps.splits[i] == "train"}


def planted_vocab(ps: PlantedSet, min_count: int = 1) -> Vocab:
    """The vocabulary of the training captions, counted by the project's own vocabulary code."""
    train = train_caption_ids(ps)
    words, rels = Counter(), Counter()
    for cid, ts in zip(ps.caption_ids, ps.triples):
        if cid in train:
            rels.update(t[0] for t in ts)
            words.update({p: w for t in ts for p, w in ((t[5], t[1]), (t[6], t[2]))}.values())
    return build_vocab(words, rels, min_count, {"planted": True})
