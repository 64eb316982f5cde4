"""Stage 1a: image fragments. Each image becomes 20 rows: the whole image, then up to 19 detections.

    row 0 (cache.WHOLE_IMAGE_ROW)  the whole image: box [0, 0, W, H], score 1, label -1, mask True
    rows 1..n                      detections by descending score (n <= 19), mask True
    rows n+1..19                   padding: zeros, label -1, mask False (never invented boxes)

All features come from one backbone pass per batch (see pipeline/detectors). One call of ``extract_shard``
loads one shard's images, runs the detector in batches and writes the shard atomically with
``cache.write_region_shard``; images that cannot be read are recorded in the shard with a reason.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from . import cache
from .cache import K_FRAGMENTS, WHOLE_IMAGE_ROW
from .detectors import DEFAULT_DETECTOR, MAX_DETECTIONS, Detector, build_detector, describe_detector
from .images import MAX_ASPECT, ImageLoadError, LoadedImage, load_image
from .sources import describe_source, is_source, open_source
from .sources.common import RowError, write_source_shard

log = logging.getLogger(__name__)

FEATURE_DTYPES = ("float16", "float32")
ON_ERROR = ("record", "fail")
WINDOW_BATCHES = 4  # images are grouped by size within this many batches
assert MAX_DETECTIONS + 1 == K_FRAGMENTS and WHOLE_IMAGE_ROW == 0


class RegionExtractionError(RuntimeError):
    """An image failed and ``on_error="fail"`` was asked for."""


@dataclass(frozen=True)
class RegionConfig:
    """Everything that changes a region cache's content (and so names its folder)."""

    detector: str = DEFAULT_DETECTOR
    detector_weights: str = "pretrained"
    seed: int = 0
    feature_dtype: str = "float16"
    max_image_side: int = 2048  # images are shrunk to this before the detector (its own resize follows)
    min_size: int = 0  # detector input size; 0 keeps the detector's own (800 / 1333 for torchvision)
    max_size: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype {self.feature_dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}")
        if self.max_image_side < 0:
            raise ValueError(f"max image side must be >= 0 (0: never shrink), got {self.max_image_side}")

    def producer(self) -> dict[str, Any]:
        """The producer record every shard carries; computed without building the detector."""
        if is_source(self.detector):  # read, not detected: image sizes and detector inputs play no part
            return {**describe_source(self.detector), "k": K_FRAGMENTS, "whole_image_row": WHOLE_IMAGE_ROW,
                    "feature_dtype": self.feature_dtype}
        det = describe_detector(self.detector, self.detector_weights, self.seed, min_size=self.min_size,
                                max_size=self.max_size, amp=self.amp)
        return {**det, "k": K_FRAGMENTS, "whole_image_row": WHOLE_IMAGE_ROW, "feature_dtype": self.feature_dtype,
                "max_image_side": self.max_image_side, "max_aspect": MAX_ASPECT}

    def build(self, device: str) -> Detector:
        return build_detector(self.detector, self.detector_weights, device, self.seed, min_size=self.min_size,
                              max_size=self.max_size, amp=self.amp)


def region_dataset(dataset) -> dict[str, Any]:
    """The dataset identity region shards carry: name and a hash of the image ids and paths (captions and
    splits do not change regions, so editing captions keeps the region cache)."""
    return {"name": dataset.name, "images": len(dataset.images), "image_list": dataset.image_identity}


def region_cache_folder(cache_dir: str | Path, dataset, config: RegionConfig, shard_size: int) -> Path:
    """``<cache_dir>/regions/<dataset>-<key>``, the key a hash of producer, dataset identity and shard size."""
    content = {"producer": config.producer(), "dataset": region_dataset(dataset), "shard_size": int(shard_size)}
    return cache.cache_folder(cache_dir, "regions", dataset.name, content)


# ------------------------------------------------------------------------------------------ the 20-row layout

def layout_fragments(height: int, width: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     features: np.ndarray, whole: np.ndarray) -> dict[str, np.ndarray]:
    """One image's detections (n, ...) and whole-image feature (D,) -> the fixed 20-row layout.

    boxes (n, 4) xyxy original pixels, scores (n,), labels (n,), features (n, D), whole (D,).
    Returns boxes (20, 4), scores (20,), labels (20,), mask (20,), features (20, D) as float32/int32/bool.
    Only the 19 best detections are kept, by descending score (ties keep the given order).
    """
    d = int(whole.shape[-1])
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:MAX_DETECTIONS]
    n = len(order)
    out = {"boxes": np.zeros((K_FRAGMENTS, 4), np.float32), "scores": np.zeros(K_FRAGMENTS, np.float32),
           "labels": np.full(K_FRAGMENTS, -1, np.int32), "mask": np.zeros(K_FRAGMENTS, bool),
           "features": np.zeros((K_FRAGMENTS, d), np.float32)}
    w = WHOLE_IMAGE_ROW
    out["boxes"][w] = (0.0, 0.0, float(width), float(height))
    out["scores"][w], out["mask"][w], out["features"][w] = 1.0, True, whole
    rows = slice(1, 1 + n)
    out["boxes"][rows] = np.asarray(boxes, np.float32).reshape(-1, 4)[order]
    out["scores"][rows] = np.asarray(scores, np.float32)[order]
    out["labels"][rows] = np.asarray(labels)[order]
    out["mask"][rows] = True
    out["features"][rows] = np.asarray(features, np.float32).reshape(-1, d)[order]
    return out


# ------------------------------------------------------------------------------------------ one shard

@dataclass
class ShardReport:
    path: Path
    images: int = 0  # written
    failed: dict[str, str] = field(default_factory=dict)  # image id -> reason


def _load_all(items: Sequence[tuple[str, Path]], max_side: int, root: Path | None
              ) -> Iterator[tuple[str, LoadedImage | ImageLoadError]]:
    """Images in order, decoded a few ahead on threads (Pillow releases the GIL) so the detector never waits."""
    def one(item: tuple[str, Path]):
        try:
            return item[0], load_image(item[1], max_side, root)
        except ImageLoadError as e:
            return item[0], e
        except Exception as e:  # noqa: BLE001 - whatever one file does, it costs only that image
            return item[0], ImageLoadError(item[1], f"cannot be loaded ({type(e).__name__}: {e})")

    with ThreadPoolExecutor(max_workers=2) as pool:
        window: list = []
        for item in items:
            window.append(pool.submit(one, item))
            if len(window) >= 8:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()


def extract_each(detector: Detector, tensors: list) -> list:
    """``detector.extract`` of a batch; when the batch fails, each image alone, so only the culprit fails.
    Returns a RegionResult or the Exception for each image."""
    try:
        out = list(detector.extract(tensors))
        if len(out) != len(tensors):
            raise RuntimeError(f"the detector returned {len(out)} results for {len(tensors)} images")
        return out
    except Exception as e:  # noqa: BLE001 - one bad image must not cost its batch
        if len(tensors) == 1:
            return [e]
        log.warning("a batch of %d images failed in the detector (%s: %s); retrying them one by one",
                    len(tensors), type(e).__name__, e)
    return [extract_each(detector, [t])[0] for t in tensors]


def extract_shard(items: Sequence[tuple[str, str | Path]], out_path: str | Path, detector: Detector, *,
                  producer: dict[str, Any], dataset: dict[str, Any], shard_index: int, num_shards: int,
                  feature_dtype: str = "float16", max_image_side: int = 2048, batch_size: int = 4,
                  on_error: str = "record", progress: Callable[[int, int], None] | None = None,
                  image_root: str | Path | None = None) -> ShardReport:
    """Extract the 20 fragments of each (image_id, path) and write one region shard to ``out_path``.

    Every path must resolve inside ``image_root`` (default: each file's own folder; see images.open_inside).
    Anything that fails for one image (reading, decoding, the detector, pooling, the layout) is recorded for that
    image (id + reason) and the rest is written; a failed batch is retried image by image to find the culprit.
    ``on_error="fail"`` raises RegionExtractionError at the first failure instead (nothing is written then).
    ``progress(done, total)`` is called after each group of batches (Luigi's progress bar).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r}: choose one of {', '.join(ON_ERROR)}")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {feature_dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}")
    items = [(str(i), Path(p)) for i, p in items]
    root = Path(image_root) if image_root is not None else None
    report = ShardReport(Path(out_path))
    rows = cache.RegionRows()
    window: list[tuple[str, LoadedImage]] = []  # a few batches, so images of one size can be batched together
    detector_failures: list[str] = []

    def fail(image_id: str, reason: str) -> None:
        if on_error == "fail":
            bar.close()
            raise RegionExtractionError(f"image {image_id!r}: {reason}")
        log.warning("skipping image %r: %s", image_id, reason)
        report.failed[image_id] = reason

    def add(image_id: str, im: LoadedImage, r) -> None:
        frag = layout_fragments(im.height, im.width, im.to_original(r.boxes.cpu().numpy()), r.scores.cpu().numpy(),
                                r.labels.cpu().numpy(), r.features.cpu().numpy(), r.whole.cpu().numpy())
        feats = frag["features"].astype(feature_dtype)
        if not np.isfinite(feats).all():
            fail(image_id, f"features overflow {feature_dtype} (largest {np.abs(frag['features']).max():.3g}); "
                           "use --feature-dtype float32")
            return
        rows.add(image_id, im.height, im.width, frag, feats)

    def flush() -> None:
        # Same-size images share a batch without padding: features do not depend on batch neighbours.
        order = sorted(range(len(window)), key=lambda i: tuple(window[i][1].tensor.shape))
        results: list = [None] * len(window)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, r in zip(idx, extract_each(detector, [window[i][1].tensor for i in idx])):
                results[i] = r
        for (image_id, im), r in zip(window, results):
            if isinstance(r, Exception):
                detector_failures.append(f"{type(r).__name__}: {r}")
                fail(image_id, f"the detector failed on this image ({type(r).__name__}: {r})")
                continue
            try:
                add(image_id, im, r)
            except RegionExtractionError:
                raise
            except Exception as e:  # noqa: BLE001 - a result that cannot be laid out costs only its image
                fail(image_id, f"its detections cannot be stored ({type(e).__name__}: {e})")
        window.clear()

    bar = tqdm(total=len(items), desc=f"regions {Path(out_path).name}", unit="img")
    done = 0
    for image_id, loaded in _load_all(items, max_image_side, root):
        if isinstance(loaded, ImageLoadError):
            fail(image_id, f"{loaded.path}: {loaded.reason}")
        else:
            window.append((image_id, loaded))
        done += 1
        if len(window) >= WINDOW_BATCHES * batch_size or (done == len(items) and window):
            flush()
            if progress and done < len(items):
                progress(done, len(items))
        bar.update(1)
    bar.close()
    if progress:
        progress(done, len(items))

    n = len(rows)
    if n == 0 and len(detector_failures) > 1:  # every image it saw: the detector is broken, not the images
        raise RegionExtractionError(f"the detector failed on all {len(detector_failures)} images of shard "
                                    f"{out_path} (first: {detector_failures[0]}); nothing was written — fix the "
                                    "detector setup (device, weights) and rerun")
    rows.write(out_path, feature_dim=int(producer.get("feature_dim", 0)), feature_dtype=feature_dtype,
               failed=report.failed, producer=producer, dataset=dataset, shard_index=shard_index,
               num_shards=num_shards)
    report.images = n
    return report


# ------------------------------------------------------------------------------------------ whole runs

_DETECTORS: dict[tuple[RegionConfig, str], Detector] = {}


def detector_for(config: RegionConfig, device: str) -> Detector:
    """One detector per (config, device) per process: shards run in the same worker share it."""
    key = (config, device)
    if key not in _DETECTORS:
        _DETECTORS.clear()  # at most one model in memory
        _DETECTORS[key] = config.build(device)
    return _DETECTORS[key]


def run_shard(dataset, out_path: str | Path, config: RegionConfig, *, shard_size: int, shard_index: int,
              device: str = "cpu", batch_size: int = 4, on_error: str = "record",
              progress: Callable[[int, int], None] | None = None) -> ShardReport:
    """Shard ``shard_index`` of ``dataset`` (images in dataset order, ``shard_size`` per shard)."""
    ranges = cache.shard_ranges(len(dataset.images), shard_size)
    if not 0 <= shard_index < len(ranges):
        raise IndexError(f"shard {shard_index} does not exist: {dataset.name} has {len(ranges)} shards of "
                         f"{shard_size} images")
    start, stop = ranges[shard_index]
    out_path = Path(out_path)
    for stale in out_path.parent.glob(f".{out_path.name}.tmp-*"):  # left by a killed earlier attempt
        log.info("removing %s, left by an interrupted run", stale)
        stale.unlink(missing_ok=True)
    producer = config.producer()
    if is_source(config.detector):
        return _read_shard(dataset, out_path, config, producer, shard_index, len(ranges), start, stop, on_error,
                           progress)
    items = [(im.image_id, dataset.image_root / im.path) for im in dataset.images[start:stop]]
    detector = detector_for(config, device)
    if any(producer.get(k) != v for k, v in detector.describe().items()):
        raise RuntimeError(f"detector {detector.describe()} differs from the cache key's {producer}: a defrag bug")
    report = extract_shard(items, out_path, detector, producer=producer, dataset=region_dataset(dataset),
                           shard_index=shard_index, num_shards=len(ranges), feature_dtype=config.feature_dtype,
                           max_image_side=config.max_image_side, batch_size=batch_size, on_error=on_error,
                           progress=progress, image_root=dataset.image_root)
    log.info("wrote region shard %d/%d (%d images, %d failed): %s", shard_index + 1, len(ranges), report.images,
             len(report.failed), out_path)
    return report


def _read_shard(dataset, out_path: Path, config: RegionConfig, producer: dict[str, Any], shard_index: int,
                num_shards: int, start: int, stop: int, on_error: str, progress) -> ShardReport:
    """A shard from a feature source (``pipeline.sources``): rows are read, no image is opened."""
    source = open_source(config.detector, index_folder=out_path.parent)
    images = dataset.images[start:stop]
    found = source.locate(dataset.images)  # the whole dataset: a name form two images share matches neither
    items = [(im.image_id, found.get(im.image_id)) for im in images]
    try:
        failed = write_source_shard(items, source.read, out_path, producer=producer,
                                    dataset=region_dataset(dataset), shard_index=shard_index, num_shards=num_shards,
                                    feature_dtype=config.feature_dtype, missing=source.missing,
                                    stop_at_first=on_error == "fail", progress=progress)
    except RowError as e:
        raise RegionExtractionError(str(e)) from None
    report = ShardReport(out_path, images=len(items) - len(failed), failed=failed)
    log.info("wrote region shard %d/%d from %s (%d images, %d failed): %s", shard_index + 1, num_shards,
             producer["backend"], report.images, len(failed), out_path)
    return report


def appeared_images(shard: str | Path, dataset: Any) -> list[str]:
    """Ids a finished shard recorded as "file not found" whose file exists now under the dataset's image root."""
    out = []
    for image_id, why in cache.read_region_shard(shard, with_features=False).failed.items():
        if why.endswith("file not found"):
            try:
                if dataset.image_path(image_id).is_file():
                    out.append(image_id)
            except KeyError:  # not an image of this dataset: nothing to look for
                pass
    return out


def summarize_failures(folder: str | Path) -> dict[str, Any]:
    """Images written and images failed (id -> reason) over every finished shard of a region cache folder."""
    total, failed = 0, {}
    for path in cache.list_shards(folder):
        block = cache.read_region_shard(path, with_features=False)
        total += len(block.image_ids)
        failed.update(block.failed)
    if failed:
        lines = "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items()))
        log.warning("%d image(s) could not be used and have no fragments:\n%s", len(failed), lines)
    return {"folder": str(folder), "images": total, "failed": failed}


__all__ = ["RegionConfig", "RegionExtractionError", "ShardReport", "appeared_images", "extract_shard",
           "layout_fragments", "region_cache_folder", "region_dataset", "run_shard", "summarize_failures",
           "detector_for", "extract_each"]
