"""Region extraction cost, measured side by side in one run (prints ratios; not a test).

    python benchmarks/bench_regions.py                          # CPU, random MobileNet-v3 FPN, 8 demo photos
    python benchmarks/bench_regions.py --device cuda --detector torchvision-r50-fpn-v2 --n 64 --batch-size 8 --amp
    python benchmarks/bench_regions.py --size-mix flickr ...    # the demo photos resized to Flickr's usual sizes
    python benchmarks/bench_regions.py --detector detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml --n 4

Measures, on the same images, model and device:
  1. the bare detector (the library's own inference: torchvision's ``model(images)``, detectron2's
     ``GeneralizedRCNN.inference`` on the same resized inputs) vs defrag's extraction (detections +
     20 pooled features per image from the same backbone pass): images/s of both and the time ratio
     (target: extraction <= 1.10x the bare detector);
  2. the naive way, as the original RCNN did it: detect, then one CNN forward per crop (19 boxes + the whole
     image, each warped to 224 x 224, through the same backbone and box head; torchvision only);
  3. a whole shard written to disk (load + extract + write): images/s, bytes per image against the ideal
     20 x D x dtype size + boxes/scores/labels/mask, and peak memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import cache  # noqa: E402
from pipeline.devices import resolve_device  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.regions import RegionConfig, extract_shard  # noqa: E402

# Flickr photos are mostly 500 px on the long side at 4:3 or 3:2, landscape more often than portrait:
# (height, width) and share of the images in --size-mix flickr
FLICKR_SIZES = (((375, 500), 0.45), ((500, 375), 0.25), ((333, 500), 0.20), ((500, 333), 0.10))


def flickr_size_mix(images: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Each image (C, H, W) in [0, 1] resized (bilinear, antialiased) to a size drawn from FLICKR_SIZES."""
    rng = np.random.default_rng(seed)
    sizes, share = zip(*FLICKR_SIZES)
    pick = rng.choice(len(sizes), len(images), p=np.asarray(share) / sum(share))
    return [torch.nn.functional.interpolate(im[None], size=sizes[k], mode="bilinear", antialias=True,
                                            align_corners=False)[0].clamp(0, 1) for im, k in zip(images, pick)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, batches, device: str, repeat: int) -> float:
    """Best of ``repeat`` passes over all batches, in seconds (one warm-up batch first)."""
    fn(batches[0])
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        for b in batches:
            fn(b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def naive_features(det, image: torch.Tensor, boxes: torch.Tensor, side: int = 224) -> torch.Tensor:
    """RCNN-style: crop each box (and the whole image), warp to side x side, one CNN forward over the crops."""
    model, rh = det.model, det.model.roi_heads
    h, w = image.shape[1:]
    crops = []
    for x0, y0, x1, y1 in torch.cat([boxes.cpu(), torch.tensor([[0.0, 0.0, w, h]])]).tolist():
        x0, y0 = int(x0), int(y0)
        x1, y1 = max(int(x1 + 0.999), x0 + 1), max(int(y1 + 0.999), y0 + 1)
        crop = image[:, y0:y1, x0:x1][None]
        crops.append(torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False))
    x = torch.cat(crops).to(det.device)  # (20, 3, side, side)
    mean = torch.tensor(model.transform.image_mean, device=x.device)[:, None, None]
    std = torch.tensor(model.transform.image_std, device=x.device)[:, None, None]
    with det._autocast():
        feats = model.backbone((x - mean) / std)
        whole = [torch.tensor([[0.0, 0.0, side, side]], device=x.device)] * len(x)
        return rh.box_head(rh.box_roi_pool(feats, whole, [(side, side)] * len(x)))  # (20, D)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="torchvision-mobilenet-v3-fpn")
    ap.add_argument("--weights", default="random", help="pretrained | PATH | random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    ap.add_argument("--n", type=int, default=8, help="images (the demo photos, repeated as needed)")
    ap.add_argument("--min-size", type=int, default=0, help="detector input short side (0: its own, 800)")
    ap.add_argument("--max-size", type=int, default=0)
    ap.add_argument("--max-image-side", type=int, default=2048)
    ap.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shard-images", type=int, default=1000, help="images in the shard used for bytes/image")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--images", default=str(ROOT / "data/demo/images"))
    ap.add_argument("--size-mix", default="demo", choices=["demo", "flickr"],
                    help="demo: the photos as they are (all sizes differ); flickr: resized to Flickr's usual sizes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = RegionConfig(args.detector, args.weights, 0, args.feature_dtype, args.max_image_side, args.min_size,
                       args.max_size, args.amp)
    t = time.perf_counter()
    det = cfg.build(device)
    build_s = time.perf_counter() - t
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = [files[i % len(files)] for i in range(args.n)]
    loaded = [load_image(p, args.max_image_side) for p in paths]
    if args.size_mix == "flickr":
        for im, t in zip(loaded, flickr_size_mix([im.tensor for im in loaded])):
            im.tensor = t
    # Same batches for every method: sorted by size, as extract_shard batches them.
    order = sorted(range(len(loaded)), key=lambda i: tuple(loaded[i].tensor.shape))
    batches = [[loaded[i].tensor for i in order[s:s + args.batch_size]] for s in range(0, len(order), args.batch_size)]

    bare_s = _timed(det.forward_bare, batches, device, args.repeat)
    # The bare detector's own post-processing depends on its scores (random weights score everything high and
    # keep 100 boxes); with every box thresholded away it costs ~nothing: a lower bound on the bare time.
    rh = getattr(det.model, "roi_heads", None)
    holder, attr = (rh, "score_thresh") if hasattr(rh, "score_thresh") else (rh.box_predictor, "test_score_thresh")
    old = getattr(holder, attr)
    setattr(holder, attr, 1.0)
    floor_s = _timed(det.forward_bare, batches, device, args.repeat)
    setattr(holder, attr, old)
    extract_s = _timed(det.extract, batches, device, args.repeat)

    def naive(batch):
        for im, r in zip(batch, det.extract(batch)):
            naive_features(det, im, r.boxes)

    naive_s = None
    if not args.detector.startswith("detectron2:"):
        with torch.inference_mode():
            naive_s = _timed(naive, batches, device, args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / cache.shard_name(0)
        items = [(f"{i}-{p.name}", p) for i, p in enumerate(paths)]
        _sync(device)
        t = time.perf_counter()
        extract_shard(items, out, det, producer=cfg.producer(), dataset={"name": "bench"}, shard_index=0,
                      num_shards=1, feature_dtype=args.feature_dtype, max_image_side=args.max_image_side,
                      batch_size=args.batch_size)
        _sync(device)
        shard_s = time.perf_counter() - t
        size = os.path.getsize(out)
        # A shard of a realistic size (the same fragments repeated): per-file overhead amortised as in real runs.
        b = cache.read_region_shard(out)
        reps = -(-args.shard_images // len(b.image_ids))
        tile = lambda a: np.concatenate([a] * reps)[:args.shard_images]  # noqa: E731
        big = cache.write_region_shard(
            Path(tmp) / cache.shard_name(1), image_ids=[f"{i}" for i in range(args.shard_images)],
            image_hw=tile(b.image_hw), boxes=tile(b.boxes), scores=tile(b.scores), labels=tile(b.labels),
            mask=tile(b.mask), features=tile(b.features), producer=cfg.producer(), dataset={"name": "bench"},
            shard_index=1, num_shards=2)
        big_size = os.path.getsize(big)
    d = det.feature_dim
    itemsize = 2 if args.feature_dtype == "float16" else 4
    ideal = 20 * d * itemsize + 20 * (4 * 4 + 4 + 4 + 1) + 2 * 4  # features + boxes, scores, labels, mask, hw
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = args.n

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# bench_regions: {args.detector} weights={args.weights} device={device} [{name}] n={n} "
          f"batch={args.batch_size} amp={args.amp} input={cfg.producer()['min_size']}/{cfg.producer()['max_size']}"
          f" dtype={args.feature_dtype} sizes={args.size_mix} (detector built in {build_s:.1f} s)")
    print(f"{'method':<44}{'seconds':>10}{'images/s':>10}{'ratio':>8}")
    rows = [("bare detector forward (model inference)", bare_s),
            ("bare forward, post-processing emptied", floor_s),
            ("extraction: 19 dets + whole, pooled features", extract_s)]
    if naive_s:
        rows.append(("naive RCNN: detect, then CNN per crop (20)", naive_s))
    rows.append(("shard end to end (load + extract + write)" + (" *" if args.size_mix != "demo" else ""), shard_s))
    for label, s in rows:
        print(f"{label:<44}{s:>10.3f}{n / s:>10.2f}{s / bare_s:>8.2f}")
    print(f"extraction / bare detector time: {extract_s / bare_s:.3f} (target <= 1.10); against the emptied "
          f"post-processing: {extract_s / floor_s:.3f}")
    if args.size_mix != "demo":
        print("* the shard row reads the photo files as they are (not resized to the size mix)")
    if naive_s:
        print(f"naive / extraction time: {naive_s / extract_s:.2f}")
    print(f"bytes per image on disk, ideal 20 x {d} x {itemsize} + boxes/scores/labels/mask/hw = {ideal:,}: "
          f"shard of {args.shard_images} images {big_size / args.shard_images:,.0f} "
          f"(ratio {big_size / args.shard_images / ideal:.3f}, target <= 1.10); "
          f"this run's {n}-image shard {size / n:,.0f} (ratio {size / n / ideal:.3f}: fixed per-file overhead)")
    print(f"peak RSS: {rss_mb:,.0f} MiB" + (f"; peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
                                            if device.startswith("cuda") else ""))


if __name__ == "__main__":
    main()
