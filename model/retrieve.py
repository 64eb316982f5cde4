"""Retrieval from the command line, both ways, with a trained run.

    python -m model.retrieve --run runs/defrag-XXXX --text "a dog runs on the grass" --top 5
    python -m model.retrieve --run runs/defrag-XXXX --image 1000268201_693b08cb0e.jpg --json
    python -m model.retrieve --run runs/defrag-XXXX --text "a rocket on a launch pad" --explain top.png
    python -m model.retrieve --run runs/defrag-XXXX --image rocket.jpg --text "a rocket" --explain pair.png

``--text`` ranks the split's images for any sentence, parsed on the fly with exactly the parser settings of the
run's triple cache; ``--image`` ranks the split's captions for a cached image; both together score that pair.
``--explain`` saves the alignment picture of the query with its top result (or of the given pair).
Bad queries (unknown image, empty sentence, a sentence without usable triples) get a message and exit code 2.
This is a command-line entry point: it is the one module of model/ that may call the parser.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pipeline.cache import CacheError, list_shards, open_shard, shard_info
from pipeline.images import ImageLoadError

from .checkpoint import CheckpointError
from .explain import draw_alignment
from .runs import (Run, RunError, alignment_dots, caption_triples, open_run, query_triples, rank_captions,
                   rank_images, region_boxes, run_picture, triple_labels)
from .wordvecs import WordVectorError, lookup

log = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query this run cannot answer; the message says why and what to do."""


def triple_producer(run: Run) -> dict:
    shards = list_shards(run.store.triple_folder)
    if not shards:
        raise CacheError(f"triple cache {run.store.triple_folder} has no shards")
    with open_shard(shards[0], "triples") as f:
        return shard_info(f).producer


def parse_query(run: Run, text: str, stanza: Mapping[str, str] | None = None) -> list[Any]:
    """Triples of a sentence, parsed with the settings of the run's triple cache.

    ``stanza``: the parse stage's model options (stanza_dir, tagger, parser) where the models now live; local
    model files are otherwise found by the sha256 the cache records.
    """
    if not text or not text.strip():
        raise QueryError("the sentence is empty: give some words, e.g. --text \"a dog runs on the grass\"")
    producer = triple_producer(run)
    if producer.get("parser") != "stanza":
        raise QueryError(f"the triple cache {run.store.triple_folder} was not made by the Stanza parser "
                         f"(producer {producer.get('parser')!r}), so free text cannot be parsed like it")
    from pipeline.parse import ParseSettings, parse_texts  # the parser, only for text queries

    runtime = {"device": "cpu", "batch_size": 1, **(stanza or {})}
    return parse_texts([text], ParseSettings.from_producer(producer, **runtime))[0]


def add_query_words(run: Run, words: Sequence[str]) -> list[str]:
    """Words of a query that the run's dictionary lacks but its word vectors have (they never occurred in the
    dataset's captions): their vectors are read from the source and appended to the model's W_e and the
    vocabulary, so the query scores as with the vectors' full table. Returns the words added."""
    vocab = run.store.vocab
    if vocab.vectors is None:
        return []
    have = set(vocab.words)
    missing = sorted({w for w in words if w not in have})
    if not missing:
        return []
    keys, rows = lookup(vocab.vectors, missing)
    if keys:
        run.model.add_words(torch.from_numpy(rows))
        run.store.vocab = replace(vocab, words=vocab.words + keys, word_counts=vocab.word_counts + [0] * len(keys),
                                  vector_rows=None)
        log.info("query words outside the dataset, embedded from %s: %s", vocab.vectors["source"], ", ".join(keys))
    return keys


def _quote(text: str, limit: int = 120) -> str:
    """A query as an error message shows it: repr, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f" (+{len(text) - limit} characters)"


def _split_with_images(run: Run, split_name: str):
    split = run.store.split(split_name)
    if split.n_images == 0:
        raise QueryError(f"the {split_name} split holds none of the {len(run.store.image_ids)} images of run "
                         f"{run.name}'s caches: the dataset given (--dataset) is not the one the run was trained on, "
                         "or pass another --split")
    return split


def query_ids(run: Run, text: str, stanza: Mapping[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    triples = parse_query(run, text, stanza)
    if not triples:
        raise QueryError(f"the parser found no dependency triples in {_quote(text)} (one-word or punctuation-only "
                         "sentences have none): write a phrase with at least two related words")
    add_query_words(run, [w for t in triples for w in (t.head, t.dep)])
    rel, w1, w2 = query_triples(run.store, triples)
    if len(rel) == 0:
        raise QueryError(f"none of the {len(triples)} triples of {_quote(text)} can be scored: their relations or "
                         "words are outside the run's vocabulary")
    return rel, w1, w2


def find_image(run: Run, split_name: str, image_id: str) -> int:
    split = run.store.split(split_name)
    ids = split.image_ids
    if image_id in ids:
        return ids.index(image_id)
    for other in run.store.splits.values():
        if image_id in other.image_ids:
            raise QueryError(f"image {image_id!r} is in the {other.name} split, not {split_name}: "
                             f"pass --split {other.name}")
    raise QueryError(f"image {image_id!r} is not among the {len(run.store.image_ids)} images of run {run.name}'s "
                     f"region cache (the {split_name} split has {len(ids)}, e.g. {', '.join(ids[:3])})")


def _top(scores: torch.Tensor, top: int) -> list[tuple[int, float]]:
    order = torch.argsort(-scores, stable=True)[:top]
    return [(int(i), float(scores[i])) for i in order]


def search(run: Run, split_name: str, text: str, top: int, stanza: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Images ranked for a sentence."""
    split = _split_with_images(run, split_name)
    rel, w1, w2 = query_ids(run, text, stanza)
    scores = rank_images(run, split, rel, w1, w2)
    ids = split.image_ids
    return {"query": {"text": text, "triples": triple_labels(run.store, rel, w1, w2)}, "split": split_name,
            "direction": "search", "candidates": split.n_images,
            "results": [{"rank": r + 1, "score": s, "id": ids[i], "image": str(run.dataset.image_path(ids[i]))}
                        for r, (i, s) in enumerate(_top(scores, top))]}


def annotate(run: Run, split_name: str, image_id: str, top: int) -> dict[str, Any]:
    """Captions ranked for an image."""
    split = run.store.split(split_name)
    i = find_image(run, split_name, image_id)
    if split.n_captions == 0:
        raise QueryError(f"the {split_name} split has no captions to rank")
    scores = rank_captions(run, split, i)
    ids = split.caption_ids
    texts = {c.caption_id: c.text for c in run.dataset.captions}
    return {"query": {"image": image_id, "path": str(run.dataset.image_path(image_id))}, "split": split_name,
            "direction": "annotation", "candidates": split.n_captions,
            "results": [{"rank": r + 1, "score": s, "id": ids[j], "caption": texts.get(ids[j], ""),
                         "own": split.caption_image[j].item() == i} for r, (j, s) in enumerate(_top(scores, top))]}


def explain_pair(run: Run, split_name: str, image_id: str, out: str | Path, *, text: str = "",
                 caption_id: str = "", stanza: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Alignment picture of an image with a free sentence or with one of the split's captions."""
    split = run.store.split(split_name)
    i = find_image(run, split_name, image_id)
    if caption_id:
        j = split.caption_ids.index(caption_id)
        rel, w1, w2 = caption_triples(split, j)
        text = next((c.text for c in run.dataset.captions if c.caption_id == caption_id), caption_id)
    else:
        rel, w1, w2 = query_ids(run, text, stanza)
    boxes, mask = region_boxes(run.store, [image_id])[image_id]
    dots, _ = alignment_dots(run, split, i, rel, w1, w2)
    labels = triple_labels(run.store, rel, w1, w2)
    draw_alignment(run_picture(run, image_id), boxes, mask, dots, labels, out, title=text)
    score = float(rank_images(run, split.subset([i]), rel, w1, w2)[0])
    return {"image": image_id, "text": text, "score": score, "picture": str(out), "triples": labels}


def format_table(result: dict[str, Any]) -> str:
    rows = result["results"]
    if result["direction"] == "search":
        head = f"Images of the {result['split']} split for: {result['query']['text']!r}\n" \
               f"triples: {', '.join(result['query']['triples'])}\n"
        cols = [(str(r["rank"]), f"{r['score']:.4f}", r["id"], r["image"]) for r in rows]
        names = ("rank", "score", "image id", "path")
    else:
        head = f"Captions of the {result['split']} split for image {result['query']['image']}\n"
        cols = [(str(r["rank"]), f"{r['score']:.4f}", r["id"] + (" *" if r["own"] else ""), r["caption"])
                for r in rows]
        names = ("rank", "score", "caption id (* = own)", "caption")
    widths = [max(len(names[k]), *(len(c[k]) for c in cols)) if cols else len(names[k]) for k in range(4)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip()
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cols]
    return head + "\n".join([line, "-" * len(line)] + body) + f"\n({result['candidates']} candidates)\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.retrieve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (<run_dir>/<run name>) or a checkpoint file")
    p.add_argument("--text", help="a sentence: rank the split's images for it")
    p.add_argument("--image", help="an image id: rank the split's captions for it")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--explain", metavar="PNG", help="save the alignment picture of the query and its top result "
                   "(or of --image with --text)")
    p.add_argument("--dataset", help="dataset name or file (default: the one the run records)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--stanza-dir", default="", help="Stanza resources folder (a package), or a folder holding the "
                   "local model files (found by their sha256)")
    p.add_argument("--stanza-tagger", default="", help="local POS model file the cache was parsed with")
    p.add_argument("--stanza-parser", default="", help="local dependency parser model file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.text is None and args.image is None:
        p.error("give --text (rank images) or --image (rank captions), or both with --explain")
    if args.top < 1:
        p.error("--top must be at least 1")
    if args.text is not None and not args.text.strip():
        print("error: the sentence is empty: give some words, e.g. --text \"a dog runs on the grass\"",
              file=sys.stderr)
        return 2
    stanza = {"stanza_dir": args.stanza_dir, "tagger": args.stanza_tagger, "parser": args.stanza_parser}
    try:
        run = open_run(args.run, dataset=args.dataset, image_root=args.image_root, device=args.device,
                       which=args.checkpoint)
        if args.text and args.image:
            if not args.explain:
                p.error("--text with --image scores that pair: add --explain PNG for its picture")
            result = explain_pair(run, args.split, args.image, args.explain, text=args.text,
                                  stanza=stanza)
            print(json.dumps(result, indent=2) if args.json else
                  f"{result['image']} with {result['text']!r}: score {result['score']:.4f}\n"
                  f"triples: {', '.join(result['triples'])}\npicture: {result['picture']}")
            return 0
        if args.text:
            result = search(run, args.split, args.text, args.top, stanza)
            if args.explain and result["results"]:
                result["picture"] = explain_pair(run, args.split, result["results"][0]["id"], args.explain,
                                                 text=args.text, stanza=stanza)["picture"]
        else:
            result = annotate(run, args.split, args.image, args.top)
            if args.explain and result["results"]:
                result["picture"] = explain_pair(run, args.split, args.image, args.explain,
                                                 caption_id=result["results"][0]["id"])["picture"]
    except (QueryError, RunError, CacheError, CheckpointError, WordVectorError, OSError,
            ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the parser's missing-models error, named without importing the parser here
        if type(e).__name__ != "StanzaModelsMissing":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = json.dumps(result, indent=2) if args.json else format_table(result) + (
        f"alignment picture: {result['picture']}\n" if result.get("picture") else "")
    print(out.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
