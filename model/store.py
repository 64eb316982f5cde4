"""The fragment store: stage-1 caches (regions, triples) + a vocabulary -> index tensors the trainer gathers from.

One global table of images (features (N, K, D) float16, mask (N, K)) and one of captions (triples as id
tensors rel, w1, w2 (T,) with offsets (M+1,)); a ``Split`` is a view (row indices) into both, so splits and
subsets never copy features. Features live in memory (on the GPU once when they fit), or, when they exceed
the memory budget, stay in the HDF5 shards: each batch reads its own rows (the same batches as in memory), or
whole shards are read through a bounded LRU for a cache larger than the machine's memory (``stream``).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import (K_FRAGMENTS, CacheError, canonical_json, damaged, list_shards, open_shard, read_strings,
                           shard_info)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- features

class MemoryFeatures:
    """All features in one float16 tensor (N, K, D), on the CPU or moved once to the GPU."""

    def __init__(self, feats: Tensor):
        self.feats = feats

    def get(self, rows: Tensor) -> Tensor:
        return self.feats[rows.to(self.feats.device)]  # (B, K, D) float16

    def to(self, device: str | torch.device) -> "MemoryFeatures":
        return MemoryFeatures(self.feats.to(device))


STREAM_MODES = ("auto", "rows", "shards")


class ShardFeatures:
    """Features read from the region shards on demand, in one of two ways.

    ``by_rows``: each batch reads just its images' rows from the shards (kept open, at most ``max_open`` files),
    so batches are exactly those of features in memory; the files' pages live in the OS page cache, not in this
    process. Otherwise whole shards are read and at most ``max_bytes`` of them stay cached (LRU): the trainer
    then keeps each batch inside one window of shards, so each shard is read about once per epoch (the way for a
    cache larger than the machine's memory).
    """

    def __init__(self, shards: list[Path], shard_of: np.ndarray, row_of: np.ndarray, shard_bytes: list[int],
                 max_bytes: int, device: str | torch.device = "cpu", by_rows: bool = False, max_open: int = 64):
        self.shards, self.shard_of, self.row_of, self.shard_bytes = shards, shard_of, row_of, shard_bytes
        self.max_bytes, self.device, self.by_rows, self.max_open = max_bytes, torch.device(device), by_rows, max_open
        self.cache: OrderedDict[int, Tensor] = OrderedDict()  # shard index -> (n, K, D) float16, LRU order
        self.files: OrderedDict[int, tuple[ExitStack, Any]] = OrderedDict()  # shard -> (its open file, features)
        self.loads = 0  # shard reads so far, or rows read by_rows (the streaming benchmark and tests read it)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[np.ndarray, Future] | None = None  # (rows, their read in the background)
        self.prefetched = 0  # gets served by a background read

    def _shard(self, s: int) -> Tensor:
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        with open_shard(self.shards[s], "regions") as f:
            feats = torch.from_numpy(np.asarray(f["features"][()], dtype=np.float16))
        self.loads += 1
        self.cache[s] = feats
        while len(self.cache) > 1 and sum(self.shard_bytes[k] for k in self.cache) > self.max_bytes:
            self.cache.popitem(last=False)  # evict the least recently used shard
        return feats

    def _open(self, s: int) -> Any:
        """The features dataset of shard s, opened (and checked) once; the least recently used file closes."""
        if s in self.files:
            self.files.move_to_end(s)
            return self.files[s][1]
        stack = ExitStack()
        dset = stack.enter_context(open_shard(self.shards[s], "regions"))["features"]
        self.files[s] = (stack, dset)
        while len(self.files) > self.max_open:
            self.files.popitem(last=False)[1][0].close()
        return dset

    def _read_rows(self, shard: np.ndarray, local: np.ndarray) -> Tensor:
        out = None
        for j in np.lexsort((local, shard)):  # shard by shard, rows in file order
            s, r = int(shard[j]), int(local[j])
            dset = self._open(s)
            if out is None:
                out = np.empty((len(shard),) + tuple(dset.shape[1:]), np.float16)
            try:
                if dset.dtype == np.float16:
                    dset.read_direct(out, np.s_[r:r + 1], np.s_[j:j + 1])
                else:
                    out[j] = dset[r]
            except OSError as e:
                raise damaged(self.shards[s], e) from None
        self.loads += len(shard)
        return torch.from_numpy(out)

    def prefetch(self, rows: Tensor) -> None:
        """Start reading ``rows`` in a background thread (by_rows), while the caller computes; ``get`` of the same
        rows then takes the result. The reads overlap the training step's matrix products."""
        if not self.by_rows or not len(rows):
            return
        self._wait()
        rows_np = rows.cpu().numpy().copy()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="defrag-prefetch")
        self._pending = (rows_np, self._pool.submit(self._read_rows, self.shard_of[rows_np], self.row_of[rows_np]))

    def _wait(self, rows: np.ndarray | None = None) -> Tensor | None:
        """Finish the background read; its result when it read exactly ``rows``. One reader at a time."""
        if self._pending is None:
            return None
        (want, future), self._pending = self._pending, None
        if rows is not None and np.array_equal(want, rows):
            self.prefetched += 1
            return future.result()  # a read error surfaces here, as it would have in get
        future.exception()  # not what is asked for: wait it out; an error will recur when those rows are read
        return None

    def get(self, rows: Tensor) -> Tensor:
        rows_np = rows.cpu().numpy()
        if rows_np.size == 0:
            raise ValueError("no rows requested")
        shard, local = self.shard_of[rows_np], self.row_of[rows_np]
        if self.by_rows:
            got = self._wait(rows_np)
            got = self._read_rows(shard, local) if got is None else got
            return got.to(self.device, non_blocking=True)
        out = None
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            block = self._shard(int(s))[torch.from_numpy(local[sel])]
            if out is None:
                out = block.new_empty((len(rows_np),) + tuple(block.shape[1:]))
            out[torch.from_numpy(sel)] = block
        return out.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Close the shards kept open (by_rows); later reads open them again."""
        self._wait()
        while self.files:
            self.files.popitem()[1][0].close()

    def to(self, device: str | torch.device) -> "ShardFeatures":
        return ShardFeatures(self.shards, self.shard_of, self.row_of, self.shard_bytes, self.max_bytes, device,
                             self.by_rows, self.max_open)


def stream_by_rows(mode: str, shards: Sequence[Path]) -> bool:
    """Whether streamed features are read row by row (``mode`` "rows"), by windows of whole shards ("shards"), or,
    "auto", by rows when the shard files fit in half the machine's available memory (the OS keeps them in its
    page cache, so random reads stay fast), else by windows."""
    check_stream(mode)
    if mode != "auto":
        return mode == "rows"
    files = sum(Path(p).stat().st_size for p in shards)
    return files < 0.5 * available_memory()


def check_stream(mode: str) -> None:
    if mode not in STREAM_MODES:
        raise ValueError(f"stream must be one of {', '.join(STREAM_MODES)}, got {mode!r}")


def available_memory() -> int:
    """Bytes of memory available to new work (Linux MemAvailable; elsewhere 0, so "auto" reads by windows)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------- splits

@dataclass
class Split:
    """A split (or subset) of the store: image rows and caption rows into the store's global tables.

    ``caption_image[m]`` is the index, within this split, of caption m's image.
    """
    name: str
    store: "FragmentStore"
    rows: Tensor  # (N,) long: global image rows
    cap_rows: Tensor  # (M,) long: global caption rows
    caption_image: Tensor  # (M,) long in [0, N)

    @property
    def n_images(self) -> int:
        return int(self.rows.numel())

    @property
    def n_captions(self) -> int:
        return int(self.cap_rows.numel())

    @property
    def image_ids(self) -> list[str]:
        return [self.store.image_ids[i] for i in self.rows.tolist()]

    @property
    def caption_ids(self) -> list[str]:
        return [self.store.caption_ids[i] for i in self.cap_rows.tolist()]

    def images(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images idx (B,) of this split -> feats (B, K, D) float16, mask (B, K) bool, on the store's device."""
        g = self.rows[idx.to(self.rows.device)]
        return self.store.features.get(g), self.store.mask[g]

    def prefetch_images(self, caps: Tensor) -> None:
        """Start reading the images of captions ``caps`` when features stream by rows (else nothing to do)."""
        feats = self.store.features
        if isinstance(feats, ShardFeatures) and feats.by_rows:
            feats.prefetch(self.rows[self.caption_image[caps.to(self.rows.device)]])

    def triples(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Captions idx (B,) -> rel, w1, w2, owner (T,) with owner in [0, B): a ragged gather, no Python loop."""
        return self.padded_triples(idx)

    def padded_triples(self, idx: Tensor, length: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``triples`` padded to ``length`` rows (None: this batch's own count): rel, w1, w2, owner (length,),
        owner B on padding rows (their ids are valid but meaningless). With ``length`` given no shape depends on
        the data (no host sync); it must be at least the batch's triple count."""
        st = self.store
        c = self.cap_rows[idx.to(self.cap_rows.device)]  # (B,) global caption rows
        start, lens = st.offsets[c], st.offsets[c + 1] - st.offsets[c]  # (B,), (B,)
        ends = torch.cumsum(lens, 0)  # (B,) where each caption's run ends in the output
        n = int(ends[-1]) if length is None and len(c) else (length or 0)
        pos = torch.arange(n, device=c.device)  # (n,)
        owner = torch.searchsorted(ends, pos, right=True)  # (n,) in [0, B]: B past the last run
        o = owner.clamp(max=max(len(c) - 1, 0))
        t = torch.where(owner < len(c), start[o] + pos - (ends - lens)[o], 0)  # (n,) global triples, 0 on padding
        if st.rel.numel() == 0:  # no triples at all: every row is padding
            return t, t.clone(), t.clone(), owner
        return st.rel[t], st.w1[t], st.w2[t], owner

    def subset(self, image_index: Tensor | list[int] | np.ndarray, name: str | None = None) -> "Split":
        """The images ``image_index`` of this split (in that order) with all their captions."""
        idx = torch.as_tensor(np.asarray(image_index), dtype=torch.long, device=self.rows.device)
        remap = torch.full((self.n_images,), -1, dtype=torch.long, device=self.rows.device)
        remap[idx] = torch.arange(len(idx), device=idx.device)
        keep = remap[self.caption_image] >= 0
        return replace(self, name=name or f"{self.name}-subset", rows=self.rows[idx], cap_rows=self.cap_rows[keep],
                       caption_image=remap[self.caption_image[keep]])


# ---------------------------------------------------------------------------------------------- the store

class _OneSource:
    """Every shard of a cache folder must come from one producer and one dataset (the caller's, when given):
    a shard of other weights or another parser in the folder is refused, naming both."""

    def __init__(self, kind: str, producer: Mapping[str, Any] | None = None):
        self.kind, self.producer, self.dataset, self.first = kind, producer, None, None

    def check(self, f: Any) -> None:
        info = shard_info(f)
        if self.first is None:
            self.first = info.path
            if self.producer is None:
                self.producer = info.producer
            self.dataset = info.dataset
        for what, want, have in (("producer", self.producer, info.producer), ("dataset", self.dataset, info.dataset)):
            if canonical_json(want) != canonical_json(have):
                raise CacheError(f"{self.kind} shard {info.path} has {what} {canonical_json(have)}, but "
                                 f"{'this run asks for' if self.first == info.path else f'{self.first} has'} "
                                 f"{canonical_json(want)}: one cache folder holds one producer's shards; delete "
                                 "the folder and rerun stage 1")


def _read_regions(folder: Path, producer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    shards = list_shards(folder)
    if not shards:
        raise CacheError(f"region cache {folder} holds no finished shards: run ExtractRegions first")
    ids, masks, shard_of, row_of, nbytes, failed, dims = [], [], [], [], [], {}, set()
    source = _OneSource("region", producer)
    for s, path in enumerate(shards):
        with open_shard(path, "regions") as f:
            source.check(f)
            sid = read_strings(f["image_ids"])
            ids += sid
            masks.append(np.asarray(f["mask"][()], bool).reshape(len(sid), K_FRAGMENTS))
            shape = f["features"].shape
            dims.add(int(shape[2]))
            shard_of.append(np.full(len(sid), s, np.int64))
            row_of.append(np.arange(len(sid), dtype=np.int64))
            nbytes.append(int(np.prod(shape)) * 2)
            if "failed_ids" in f:
                failed.update(zip(read_strings(f["failed_ids"]), read_strings(f["failed_reasons"])))
    if len(dims) > 1:
        raise CacheError(f"region cache {folder} mixes feature sizes {sorted(dims)}: rebuild it")
    return {"shards": shards, "ids": ids, "mask": np.concatenate(masks), "shard_of": np.concatenate(shard_of),
            "row_of": np.concatenate(row_of), "shard_bytes": nbytes, "failed": failed, "dim": dims.pop()}


def fits_on(device: str | torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of features fit the GPU ``device`` with room to train (under 70% of its free memory)."""
    device = torch.device(device)
    return device.type == "cuda" and nbytes < 0.7 * torch.cuda.mem_get_info(device)[0]


def _load_features(shards: list[Path], n: int, k: int, dim: int, device: str | torch.device = "cpu",
                   through_host_buffer: bool | None = None) -> Tensor:
    """All features in one preallocated float16 tensor on ``device``, read shard by shard: on the CPU straight
    into it (no concatenated copy); elsewhere through one shard-sized host array at a time, so the host never
    holds them all (``through_host_buffer`` forces either way; the tests run the GPU way on the CPU)."""
    device = torch.device(device)
    buffered = device.type != "cpu" if through_host_buffer is None else through_host_buffer
    out = torch.empty((n, k, dim), dtype=torch.float16, device=device)
    view, at = (None if buffered else out.numpy()), 0
    for path in shards:
        with open_shard(path, "regions") as f:
            dset = f["features"]
            m = dset.shape[0]
            if m and buffered:
                out[at:at + m].copy_(torch.from_numpy(np.asarray(dset[()], dtype=np.float16)))
            elif m:
                if dset.dtype == np.float16:
                    dset.read_direct(view, dest_sel=np.s_[at:at + m])
                else:
                    view[at:at + m] = dset[()]
            at += m
    return out


def vocab_maps(vocab: Any) -> tuple[dict[str, int], dict[str, int], int, int | None]:
    """String -> id maps of a vocabulary: (word ids, relation ids, unknown word id, unknown relation id or None).

    Captions in the store and free-text queries (model/runs.py) map through the same rules.
    """
    words, rels = list(vocab.words), list(vocab.relations)
    unk = getattr(vocab, "unk", "<unk>")
    word_ix = {w: i for i, w in enumerate(words)}
    rel_ix = {r: i for i, r in enumerate(rels)}
    return word_ix, rel_ix, word_ix.get(unk, 0), rel_ix.get(unk)


def map_triples(maps: tuple, rels: Sequence[str], heads: Sequence[str], deps: Sequence[str],
                skip_unknown: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Triple strings -> relation, head, dependent ids (T,) with ``keep`` and ``is_unk`` masks (T,) bool.

    ``maps`` is ``vocab_maps(vocab)``. Unknown words map to the unknown word; an unknown relation maps to the
    unknown relation, or is dropped when the vocabulary has none; ``skip_unknown`` drops every triple with an
    unknown word or relation (the original code).
    """
    word_ix, rel_ix, unk, unk_rel = maps
    missing_rel = -1 if unk_rel is None else unk_rel
    r_id = np.array([rel_ix.get(r, missing_rel) for r in rels], np.int64)
    h_id = np.array([word_ix.get(w, unk) for w in heads], np.int64)
    d_id = np.array([word_ix.get(w, unk) for w in deps], np.int64)
    is_unk = (h_id == unk) | (d_id == unk) | (r_id == missing_rel)
    keep = ~is_unk if skip_unknown else r_id >= 0
    return r_id, h_id, d_id, keep, is_unk


class FragmentStore:
    """Region cache + triple cache + vocabulary -> tensors (see the module docstring).

    ``splits`` maps image id -> "train" | "val" | "test" (the dataset's split). Images that failed extraction
    (or are missing from the region cache) are dropped with their captions, with a log line.
    ``skip_unknown`` drops triples with a word or relation outside the vocabulary (the original code dropped
    out-of-vocabulary triples); otherwise they map to the vocabulary's unknown entries ("<unk>", index 0).
    Words are the triples' word forms (head, dep), as the vocabulary counts them. ``producers`` ({"regions",
    "triples"}: the shards' producer records) refuses caches made by another detector, weights or parser; every
    shard of a folder must share one producer in any case. ``device``: where in-memory features are loaded,
    shard by shard (a GPU only when they fit it; the rest of the store stays on the CPU until ``to``).
    ``stream``: how features over the budget are read ("auto" | "rows" | "shards", see ``stream_by_rows``).
    """

    def __init__(self, region_folder: str | Path, triple_folder: str | Path, vocab: Any,
                 splits: Mapping[str, str], *, skip_unknown: bool = False, memory_budget_bytes: int | None = None,
                 producers: Mapping[str, Mapping[str, Any]] | None = None, device: str | torch.device = "cpu",
                 stream: str = "auto"):
        self.region_folder, self.triple_folder = Path(region_folder), Path(triple_folder)
        if isinstance(vocab, (str, Path)):
            from pipeline.vocab import load_vocab

            vocab = load_vocab(vocab)
        self.vocab = vocab
        self.skip_unknown = skip_unknown

        producers = producers or {}
        reg = _read_regions(self.region_folder, producers.get("regions"))
        self.feat_dim = reg["dim"]
        known = {i: n for n, i in enumerate(reg["ids"])}
        in_split = [i for i in reg["ids"] if i in splits]
        if len(in_split) < len(reg["ids"]):
            log.warning("%d images of %s are not in the dataset's splits: ignored",
                        len(reg["ids"]) - len(in_split), self.region_folder)
        if reg["failed"]:
            log.warning("%d images failed region extraction and are dropped with their captions (first: %s: %s)",
                        len(reg["failed"]), *next(iter(reg["failed"].items())))
        self.image_ids: list[str] = reg["ids"]
        self.mask = torch.from_numpy(reg["mask"])  # (N, K) bool
        self.cache_keys = {"regions": self.region_folder.name, "triples": self.triple_folder.name}

        feature_bytes = len(reg["ids"]) * K_FRAGMENTS * self.feat_dim * 2
        self.feature_bytes = feature_bytes
        self.streaming = memory_budget_bytes is not None and feature_bytes > memory_budget_bytes
        check_stream(stream)
        if self.streaming:
            by_rows = stream_by_rows(stream, reg["shards"])  # auto: sizes up the shard files, only when streaming
            log.info("features (%.2f GB) exceed the memory budget (%.2f GB): streaming from %d shards, %s",
                     feature_bytes / 1e9, memory_budget_bytes / 1e9, len(reg["shards"]),
                     "each batch's rows (the same batches as in memory)" if by_rows else
                     "by windows of whole shards (batches stay inside a window)")
            self.features: MemoryFeatures | ShardFeatures = ShardFeatures(
                reg["shards"], reg["shard_of"], reg["row_of"], reg["shard_bytes"], memory_budget_bytes,
                by_rows=by_rows)
        else:  # straight onto a GPU that has room for them (the trainer's peak host memory stays low)
            on = device if torch.device(device).type == "cpu" or fits_on(device, feature_bytes) else "cpu"
            self.features = MemoryFeatures(_load_features(reg["shards"], len(reg["ids"]), K_FRAGMENTS,
                                                          self.feat_dim, on))

        self._read_triples(known, producers.get("triples"))
        self._make_splits(splits)

    # -------------------------------------------------------------------------------------- triples
    def _read_triples(self, known: Mapping[str, int], producer: Mapping[str, Any] | None = None) -> None:
        shards = list_shards(self.triple_folder)
        if not shards:
            raise CacheError(f"triple cache {self.triple_folder} holds no finished shards: run ParseSentences")
        maps = vocab_maps(self.vocab)
        cap_ids, cap_img, lens, rel, w1, w2 = [], [], [], [], [], []
        dropped_caps, unknown_words, dropped_triples, failed = 0, 0, 0, 0
        source = _OneSource("triple", producer)
        for path in shards:
            with open_shard(path, "triples") as f:
                source.check(f)
                ids, imgs = read_strings(f["caption_ids"]), read_strings(f["image_ids"])
                offsets = np.asarray(f["offsets"][()], np.int64)
                r_s, h_s, d_s = (read_strings(f[c]) for c in ("rel", "head", "dep"))
                failed += len(read_strings(f["failed_ids"])) if "failed_ids" in f else 0
            # map strings to ids once per shard (a dict lookup per triple; T is a few million at most)
            r_id, h_id, d_id, keep, is_unk = map_triples(maps, r_s, h_s, d_s, self.skip_unknown)
            unknown_words += int(is_unk.sum())
            dropped_triples += int((~keep).sum())
            cap_of = np.repeat(np.arange(len(ids)), np.diff(offsets))  # (T_shard,) caption of each triple
            kept_caps = np.array([iid in known for iid in imgs], bool)  # captions whose image is in the cache
            keep &= kept_caps[cap_of]
            dropped_caps += int((~kept_caps).sum())
            cap_ids += [c for c, k in zip(ids, kept_caps) if k]
            cap_img += [known[i] for i, k in zip(imgs, kept_caps) if k]
            lens.append(np.bincount(cap_of[keep], minlength=len(ids))[kept_caps])
            rel.append(r_id[keep]), w1.append(h_id[keep]), w2.append(d_id[keep])
        if dropped_caps:
            log.warning("%d captions dropped: their image is not in the region cache %s (failed extraction?)",
                        dropped_caps, self.region_folder)
        if failed:
            log.warning("%d captions failed parsing in %s and have no triples", failed, self.triple_folder)
        log.info("triples: %d kept, %d dropped, %d with an unknown word or relation (skip_unknown=%s)",
                 sum(len(r) for r in rel), dropped_triples, unknown_words, self.skip_unknown)
        self.caption_ids: list[str] = cap_ids
        self.caption_image = torch.as_tensor(np.asarray(cap_img, np.int64))  # (M,) global image row
        lens_all = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.offsets = torch.zeros(len(cap_ids) + 1, dtype=torch.long)
        self.offsets[1:] = torch.from_numpy(np.cumsum(lens_all))
        self.rel, self.w1, self.w2 = (torch.from_numpy(np.concatenate(x) if x else np.zeros(0, np.int64))
                                      for x in (rel, w1, w2))

    def _make_splits(self, splits: Mapping[str, str]) -> None:
        split_of = np.array([splits.get(i, "") for i in self.image_ids], dtype=object)
        self.splits: dict[str, Split] = {}
        cap_img = self.caption_image.numpy()
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(split_of == name)
            local = np.full(len(self.image_ids), -1, np.int64)
            local[rows] = np.arange(len(rows))
            caps = np.flatnonzero(local[cap_img] >= 0) if len(cap_img) else np.zeros(0, np.int64)
            self.splits[name] = Split(name, self, torch.from_numpy(rows), torch.from_numpy(caps),
                                      torch.from_numpy(local[cap_img[caps]]))
        log.info("fragment store: %s", ", ".join(f"{s.name} {s.n_images} images / {s.n_captions} captions"
                                                  for s in self.splits.values()))

    # -------------------------------------------------------------------------------------- access
    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; the store has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def n_words(self) -> int:
        return len(self.vocab.words)

    @property
    def n_relations(self) -> int:
        return len(self.vocab.relations)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def to(self, device: str | torch.device) -> "FragmentStore":
        """Move index tensors (and in-memory features) to ``device`` once; the trainer gathers there."""
        device = torch.device(device)
        for name in ("mask", "offsets", "rel", "w1", "w2", "caption_image"):
            setattr(self, name, getattr(self, name).to(device))
        self.features = self.features.to(device)
        for s in self.splits.values():
            s.rows, s.cap_rows, s.caption_image = s.rows.to(device), s.cap_rows.to(device), s.caption_image.to(device)
        return self

    def describe(self) -> dict:
        return {"images": len(self.image_ids), "captions": len(self.caption_ids), "triples": int(self.rel.numel()),
                "feat_dim": self.feat_dim, "feature_bytes": self.feature_bytes, "streaming": self.streaming,
                **{f"{n}_images": s.n_images for n, s in self.splits.items()}}


@torch.no_grad()
def encode_images(model: torch.nn.Module, split: Split, device: str | torch.device | None = None,
                  batch: int = 500) -> tuple[Tensor, Tensor]:
    """Every image fragment of a split: img_vecs (Ni, h), img_owner (Ni,) in [0, n_images), filled in place."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = int(split.store.mask[split.rows].sum())
    vecs = torch.empty(n, model.h, device=device)
    owner = torch.empty(n, dtype=torch.long, device=device)
    at = 0
    for a in range(0, split.n_images, batch):
        feats, mask = split.images(torch.arange(a, min(a + batch, split.n_images)))
        v, o = model.image_fragments(feats.to(device), mask.to(device))
        vecs[at:at + len(o)], owner[at:at + len(o)] = v, o + a
        at += len(o)
    return vecs, owner


@torch.no_grad()
def encode_captions(model: torch.nn.Module, split: Split, device: str | torch.device | None = None,
                    start: int = 0, stop: int | None = None, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Sentence fragments of captions [start, stop) of a split: sent_vecs (Ns, h), sent_owner (Ns,) in
    [0, stop - start), filled in place."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop = split.n_captions if stop is None else stop
    c = split.cap_rows[start:stop]
    n = int((split.store.offsets[c + 1] - split.store.offsets[c]).sum())
    vecs = torch.empty(n, model.h, device=device)
    owner = torch.empty(n, dtype=torch.long, device=device)
    at = 0
    for a in range(start, stop, batch):
        rel, w1, w2, o = (t.to(device) for t in split.triples(torch.arange(a, min(a + batch, stop))))
        s, _ = model.sentence_fragments(rel, w1, w2, o)
        vecs[at:at + len(o)], owner[at:at + len(o)] = s, o + (a - start)
        at += len(o)
    return vecs, owner


def encode(model: torch.nn.Module, split: Split, device: str | torch.device | None = None,
           batch: int = 500) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every fragment of a split through the model: img_vecs (Ni, h), img_owner (Ni,) in [0, n_images),
    sent_vecs (Ns, h), sent_owner (Ns,) in [0, n_captions) — the input of ``pair_scores``/``score_matrix``.

    Validation and evaluation both call this (or its two halves). Chunks of ``batch`` images or captions go
    through the model in eval mode, without gradients.
    """
    was_training = model.training
    model.eval()
    try:
        iv, io = encode_images(model, split, device, batch)
        sv, so = encode_captions(model, split, device, batch=batch)
    finally:
        model.train(was_training)
    return iv, io, sv, so
