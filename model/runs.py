"""A trained run and its data, for evaluation, retrieval and explanation.

``open_run`` rebuilds what a run folder (``<run_dir>/<run name>/``) was trained on: its best checkpoint, the
fragment store over the caches named in ``config.json`` and the dataset (image files, caption texts, splits).
Every score here is the objective's ``pair_scores`` (S_kl) with the run's own ``smooth`` and threshold.
No detector and no parser: a text query arrives here already parsed into triples.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import CacheError, list_shards, open_shard, read_region_shard, shard_info, write_text_atomic
from pipeline.images import read_picture

from .checkpoint import CheckpointError, check_checkpoint, checkpoint_path, load_model
from .defrag import DeFrag
from .evaluate import first_captions, metrics_table, protocol_metrics, score_matrix
from .published import published
from .store import FragmentStore, Split, encode, encode_captions, encode_images, map_triples, vocab_maps

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"  # {"dataset": name or path, "image_root": folder or ""} beside config.json


class RunError(RuntimeError):
    """A run folder is missing, incomplete, or names caches that are gone; the message says what to do."""


@dataclass
class Run:
    folder: Path
    model: DeFrag
    checkpoint: dict
    config: dict  # config.json
    store: FragmentStore
    dataset: Any  # data.records.Dataset
    device: torch.device

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def smooth(self) -> float:
        return float(self.checkpoint["config"].get("smooth", 10.0))

    @property
    def threshold(self) -> bool:
        return bool(self.checkpoint["config"].get("threshold_global", True))


def _existing(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists() and (Path("runs") / p).exists():
        p = Path("runs") / p
    if not p.exists():
        raise RunError(f"run {run} does not exist: give a run folder (<run_dir>/<run name>), e.g. one written by "
                       "`luigi --module tasks TrainEmbedding ...`")
    return p


def resolve_run(run: str | Path) -> Path:
    """A run folder, or a run directory holding exactly one run, or the name of a run under ``runs/``, or a
    checkpoint file (its folder)."""
    p = _existing(run)
    if p.is_dir() and not (p / "config.json").exists():
        runs = sorted(q for q in p.iterdir() if (q / "config.json").exists())
        if len(runs) == 1:
            return runs[0]
        if runs:
            raise RunError(f"{p} holds {len(runs)} runs ({', '.join(q.name for q in runs)}): name one")
        raise RunError(f"{p} is not a run folder (no config.json): train first (TrainEmbedding)")
    return p.parent if p.is_file() else p


def _source(config: dict, kind: str, folder: Path) -> Path:
    src = (config.get("sources") or {}).get(kind)
    if not src:
        raise RunError(f"{folder / 'config.json'} names no {kind} source: the run is from an older defrag; retrain")
    p = Path(src)
    # relative to where training ran: usually the folder holding the runs folder
    for candidate in (p, folder.parent.parent / p):
        if candidate.exists():
            return candidate
    raise RunError(f"the {kind} of run {folder} ({p}, relative to the folder training ran in) is not found from "
                   f"{os.getcwd()} nor beside the runs folder ({folder.parent.parent}): run from the folder training "
                   "ran in, or rebuild the caches there with the same settings")


def dataset_reference(folder: Path) -> dict | None:
    f = folder / DATASET_FILE
    return json.loads(f.read_text()) if f.exists() else None


def write_dataset_reference(folder: str | Path, dataset: str, image_root: str = "") -> Path:
    """Record which dataset a run belongs to, so retrieval and reports find its images and captions."""
    return write_text_atomic(Path(folder) / DATASET_FILE,
                             json.dumps({"dataset": dataset, "image_root": image_root}, indent=2) + "\n")


def open_run(run: str | Path, *, dataset: Any = None, image_root: str | None = None,
             device: str | torch.device = "cpu", which: str = "best") -> Run:
    """Load a run's model, its fragment store and its dataset (``dataset``: a Dataset, a name or a path;
    default: what ``dataset.json`` in the run folder records)."""
    from data import load_dataset

    folder = resolve_run(run)
    named = _existing(run)
    if named.is_file() and not (folder / "config.json").exists():
        raise RunError(f"{named} is not inside a run folder ({folder} has no config.json): give the run folder "
                       "the checkpoint belongs to, or a checkpoint inside it")
    ckpt_path = named if named.is_file() else checkpoint_path(folder, which)  # a file given is the one loaded
    if not ckpt_path.is_file():  # before the dataset: a run whose training failed has nothing else to offer
        raise RunError(f"run {folder} has no checkpoint ({ckpt_path.name}): its training has not finished an "
                       "epoch; train it (TrainEmbedding, with --resume to continue it)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{folder / 'config.json'} cannot be read ({type(e).__name__}: {e}): the run folder is "
                       "damaged; train it again (TrainEmbedding) or restore the file") from None
    sources = config.get("sources") if isinstance(config, dict) else None
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise RunError(f"{folder / 'config.json'} is not a run's config (no object with its cache paths under "
                       "'sources'): the run folder is damaged; train it again (TrainEmbedding) or restore the file")
    if dataset is None or isinstance(dataset, (str, Path)):
        ref = dataset_reference(folder) or {}
        name = dataset or ref.get("dataset")
        if not name:
            raise RunError(f"run {folder} does not record its dataset ({DATASET_FILE}): pass --dataset "
                           "(and --image-root)")
        dataset = load_dataset(str(name), image_root or ref.get("image_root") or None)
    try:
        model, ckpt = load_model(ckpt_path, device, which)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    store = FragmentStore(_source(config, "regions", folder), _source(config, "triples", folder),
                          _source(config, "vocab", folder), {im.image_id: im.split for im in dataset.images},
                          skip_unknown=bool((ckpt.get("config") or {}).get("skip_unknown", False)))
    if store.vocab.key != ckpt.get("vocab_key"):
        raise RunError(f"the vocabulary {config['sources']['vocab']} (key {store.vocab.key}) is not the one "
                       f"{ckpt_path} was trained with ({ckpt.get('vocab_key')}): rebuild it "
                       "with the run's settings or retrain")
    try:  # a checkpoint copied in from another run reads other caches: its scores would be meaningless here
        check_checkpoint(ckpt, ckpt_path, expect_cache_keys=store.cache_keys)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    return Run(folder, model, ckpt, config, store, dataset, torch.device(device))


# ---------------------------------------------------------------------------------------------- scoring

def split_scores(run: Run, split: Split) -> Tensor:
    """(n_images, n_captions) S_kl of every image and caption of a split."""
    iv, io, sv, so = encode(run.model, split, run.device)
    return score_matrix(iv, io, split.n_images, sv, so, split.n_captions,
                        smooth=run.smooth, threshold=run.threshold)


def evaluate_split(run: Run, split_name: str = "test", captions_per_image: int = 5,
                   fold_size: int = 1000) -> dict[str, Any]:
    """The protocols of ``model.evaluate`` on one split, with the first ``captions_per_image`` captions
    of each image (0: all)."""
    split = run.store.split(split_name)
    if split.n_images == 0 or split.n_captions == 0:
        others = [n for n in ("val", "test", "train") if n != split_name and n in run.store.splits
                  and run.store.splits[n].n_images and run.store.splits[n].n_captions]
        hint = f"evaluate another split ({', '.join(f'--split {n}' for n in others)})" if others else \
            "the dataset has no split with images and captions"
        raise RunError(f"split {split_name!r} of run {run.folder} has {split.n_images} images and "
                       f"{split.n_captions} captions with fragments: nothing to evaluate; {hint}")
    return evaluation_result(run, split_name, split_scores(run, split), captions_per_image, fold_size)


RANDOM_WEIGHTS_NOTE = ("Detector weights were random: region features carry no meaning, so these numbers only show "
                       "that the stages run. Use pretrained (or trained) detector weights for real results.")


def detector_weights(run: Run) -> str:
    """How the run's region features were made: "pretrained", "file", "random" (or "unknown")."""
    shards = list_shards(run.store.region_folder)
    if not shards:
        return "unknown"
    with open_shard(shards[0], "regions") as f:
        return str(shard_info(f).producer.get("weights", "unknown"))


def evaluation_result(run: Run, split_name: str, scores: Tensor, captions_per_image: int = 5,
                      fold_size: int = 1000) -> dict[str, Any]:
    """The protocols on an already scored split (n_images, n_captions), with the run's description."""
    cap_img = run.store.split(split_name).caption_image.cpu()
    keep = first_captions(cap_img, captions_per_image)
    out = protocol_metrics(scores[:, keep], cap_img[keep], fold_size)
    out.update({"run": run.name, "split": split_name, "checkpoint_epoch": int(run.checkpoint["epoch"]),
                "captions_per_image": captions_per_image, "fold_size": fold_size, "dataset": run.dataset.describe(),
                "detector_weights": detector_weights(run),
                "score": {"smooth": run.smooth, "threshold": run.threshold}})
    sizes = {s: len(run.dataset.split_images(s)) for s in ("train", "val", "test")}
    paper = published(run.dataset.name, sizes)
    if paper is not None:
        out["published"] = paper  # the paper's figures, kept apart from this run's measured ones
    return out


def published_markdown(result: dict[str, Any]) -> str:
    """The paper's figures for the recognised dataset, as their own labelled table ("" when unknown)."""
    paper = result.get("published")
    if not paper:
        return ""
    if not paper["rows"]:
        return f"\nThe DeFrag paper reports no {paper['label']} results ({paper['citation']}).\n"
    return (f"\nPublished figures, not measured here: DeFrag on {paper['label']}, {paper['protocol']}, from "
            f"{paper['citation']}.\n\n" + metrics_table(paper["rows"]))


def evaluation_markdown(result: dict[str, Any]) -> str:
    rows = {f"DeFrag ({result['run']}, {result['split']}, {result['all']['n_images']} images)": result["all"]}
    if "folds" in result:
        rows[f"DeFrag ({result['run']}, mean of {result['folds']['n_folds']} folds of "
             f"{result['folds']['n_images']})"] = result["folds"]
    return (f"# Retrieval on {result['dataset']['name']} / {result['split']}\n\n" + metrics_table(rows) +
            f"\nRecalls in %. Checkpoint of epoch {result['checkpoint_epoch']}; "
            f"{result['all']['n_captions']} captions (" +
            (f"the first {result['captions_per_image']} of each image" if result['captions_per_image'] else "all") +
            "); "
            "ties ranked pessimistically.\n" +
            (f"\n**{RANDOM_WEIGHTS_NOTE}**\n" if result.get("detector_weights") == "random" else "") +
            published_markdown(result))


def write_evaluation(run: Run, split_name: str = "test", captions_per_image: int = 5,
                     fold_size: int = 1000) -> tuple[Path, Path]:
    """eval-<split>.json and eval-<split>.md in the run folder (atomic writes)."""
    result = evaluate_split(run, split_name, captions_per_image, fold_size)
    paths = (run.folder / f"eval-{split_name}.json", run.folder / f"eval-{split_name}.md")
    for path, text in zip(paths, (json.dumps(result, indent=2) + "\n", evaluation_markdown(result))):
        write_text_atomic(path, text)
    log.info("evaluation of %s on %s:\n%s", run.name, split_name, evaluation_markdown(result))
    return paths


# ---------------------------------------------------------------------------------------------- queries

def query_triples(store: FragmentStore, triples: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Parsed triples (pipeline.triples.Triple) -> rel, w1, w2 (T,) ids, with the store's rules for unknown
    words and relations (``model.store.map_triples``: the training captions went through the same)."""
    r, h, d, keep, _ = map_triples(vocab_maps(store.vocab), [t.rel for t in triples], [t.head for t in triples],
                                   [t.dep for t in triples], store.skip_unknown)
    return tuple(torch.from_numpy(x[keep]) for x in (r, h, d))


def triple_labels(store: FragmentStore, rel: Tensor, w1: Tensor, w2: Tensor) -> list[str]:
    """``rel(head, dependent)`` of id triples as the model sees them (unknown words show as <unk>)."""
    from .explain import triple_label

    v = store.vocab
    return [triple_label(v.relations[r], v.words[a], v.words[b])
            for r, a, b in zip(rel.tolist(), w1.tolist(), w2.tolist())]


@torch.no_grad()
def sentence_vectors(run: Run, rel: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """(T, h) fragment vectors of one sentence."""
    owner = torch.zeros(len(rel), dtype=torch.long, device=run.device)
    s, _ = run.model.sentence_fragments(rel.to(run.device), w1.to(run.device), w2.to(run.device), owner)
    return s


@torch.no_grad()
def rank_images(run: Run, split: Split, rel: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """(n_images,) S_kl of every image of the split with one sentence given as id triples."""
    s = sentence_vectors(run, rel, w1, w2)  # (T, h)
    iv, io = encode_images(run.model, split, run.device)
    owner = torch.zeros(len(s), dtype=torch.long, device=run.device)
    return score_matrix(iv, io, split.n_images, s, owner, 1, smooth=run.smooth,
                        threshold=run.threshold)[:, 0]


@torch.no_grad()
def rank_captions(run: Run, split: Split, image_index: int) -> Tensor:
    """(n_captions,) S_kl of one image of the split with every caption of the split."""
    feats, mask = split.images(torch.tensor([image_index]))
    iv, io = run.model.image_fragments(feats.to(run.device), mask.to(run.device))  # (n_real, h)
    sv, so = encode_captions(run.model, split, run.device)
    return score_matrix(iv, io, 1, sv, so, split.n_captions, smooth=run.smooth,
                        threshold=run.threshold)[0]


def caption_triples(split: Split, caption_index: int) -> tuple[Tensor, Tensor, Tensor]:
    rel, w1, w2, _ = split.triples(torch.tensor([caption_index]))
    return rel.cpu(), w1.cpu(), w2.cpu()


@torch.no_grad()
def alignment_dots(run: Run, split: Split, image_index: int, rel: Tensor, w1: Tensor,
                   w2: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Fragment scores v_i . s_j of one image and one sentence: (real fragments, T), and the image's mask (K,)."""
    feats, mask = split.images(torch.tensor([image_index]))
    iv, _ = run.model.image_fragments(feats.to(run.device), mask.to(run.device))  # (n_real, h) in row order
    s = sentence_vectors(run, rel, w1, w2)  # (T, h)
    return (iv @ s.T).float().cpu().numpy(), mask[0].cpu().numpy()


def region_boxes(store: FragmentStore, image_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image id -> (boxes (K, 4), mask (K,)) read from the region cache (features are not read)."""
    want, out = set(image_ids), {}
    for path in list_shards(store.region_folder):
        block = read_region_shard(path, with_features=False)
        for n, iid in enumerate(block.image_ids):
            if iid in want:
                out[iid] = (block.boxes[n], block.mask[n])
        if len(out) == len(want):
            break
    missing = want - set(out)
    if missing:
        raise CacheError(f"region cache {store.region_folder} has no boxes for {sorted(missing)[:3]}")
    return out


def run_picture(run: Run, image_id: str, max_side: int = 0):
    """The dataset image of ``image_id`` as a viewer shows it, read only from inside the image root
    (``pipeline.images.read_picture``); raises ImageLoadError with the reason."""
    return read_picture(run.dataset.image_path(image_id), run.dataset.image_root, max_side)


def file_stem(*ids: str) -> str:
    """A file name stem for one or more ids that never collides: a readable prefix of each id plus a short
    hash of all of them (``a/b.jpg`` and ``a_b.jpg``, or two ids sharing a long prefix, differ)."""
    import hashlib
    import re

    digest = hashlib.sha256("\0".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", i)[:40].strip("._") or "x" for i in ids)
    return f"{readable}-{digest}"
