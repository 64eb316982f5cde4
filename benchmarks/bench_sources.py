"""Reading bottom-up-attention TSV features: memory stays bounded while a large file streams (prints figures and
ratios measured side by side in one run; not a test).

    python benchmarks/bench_sources.py                 # 1,000 rows x 36 x 2048 float32: ~400 MB of TSV
    python benchmarks/bench_sources.py --rows 3000     # ~1.2 GB

Writes a TSV in generate_tsv.py's 6-field form (two parts, half the rows LXMERT's 10-field form) into a temporary
folder, then in a fresh child process runs every region shard of a JSONL dataset naming those images through
``--detector butd-tsv:<glob>`` (index pass + shards of ``--shard-size`` images) and reports the child's peak RSS
against the file size and against the same child's RSS after imports, and the cache's bytes per image. Also times the sampled file identity of
the cache key against a full sha256 of the same files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHILD = r"""
import json, resource, sys, time
sys.path[:0] = [sys.argv[1]]
from data import load_dataset
from pipeline.cache import shard_ranges
from pipeline.regions import RegionConfig, region_cache_folder, run_shard
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = load_dataset(sys.argv[2])
cfg = RegionConfig("butd-tsv:" + sys.argv[3], feature_dtype="float16")
size = int(sys.argv[4])
folder = region_cache_folder(sys.argv[5], ds, cfg, size)
t0 = time.perf_counter()
n = failed = 0
for i in range(len(shard_ranges(len(ds.images), size))):
    r = run_shard(ds, folder / f"shard-{i:05d}.h5", cfg, shard_size=size, shard_index=i)
    n += r.images; failed += len(r.failed)
dt = time.perf_counter() - t0
print(json.dumps({"base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": dt, "images": n, "failed": failed}))
"""


def main() -> None:
    from feature_files import image_regions, tsv_line
    from pipeline.sources.common import sampled_sha256

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = [tmp / "feats.tsv.0", tmp / "feats.tsv.1"]
        with open(parts[0], "w", newline="") as f0, open(parts[1], "w", newline="") as f1, \
                open(tmp / "captions.jsonl", "w") as cap:
            for i in range(args.rows):  # streamed: the writer never holds the file either
                b, x, c = image_regions(rng, args.boxes, args.dim)
                (f0 if i < args.rows // 2 else f1).write(tsv_line(i + 1, b, x, c if i % 2 else None))
                cap.write(json.dumps({"image": f"COCO_val2014_{i + 1:012d}.jpg", "caption": "a dog runs",
                                      "split": "test"}) + "\n")
        size = sum(p.stat().st_size for p in parts)
        print(f"TSV: {args.rows} rows x {args.boxes} x {args.dim} in 2 parts, {size / 2**20:.0f} MiB")

        t0 = time.perf_counter()
        for p in parts:
            sampled_sha256(p)  # first call: nothing cached yet
        t_sampled = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in parts:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        t_full = time.perf_counter() - t0
        print(f"file identity: sampled {1000 * t_sampled:.1f} ms, full sha256 {1000 * t_full:.0f} ms "
              f"-> {t_full / max(t_sampled, 1e-9):.0f}x")

        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(tmp / "captions.jsonl"),
                              str(tmp / "feats.tsv.*"), str(args.shard_size), str(tmp / "cache")],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak, base = r["peak_kib"] / 1024, r["base_kib"] / 1024
        print(f"shards: {r['images']} images ({r['failed']} failed) in {r['seconds']:.1f} s "
              f"({r['images'] / r['seconds']:.0f} img/s, {size / 2**20 / r['seconds']:.0f} MiB/s of TSV incl. the "
              f"index pass)")
        shard_bytes = sum(p.stat().st_size for p in (tmp / "cache").rglob("shard-*.h5"))
        index_bytes = sum(p.stat().st_size for p in (tmp / "cache").rglob("source-index.json"))
        print(f"region cache: {shard_bytes / r['images']:,.0f} B per image (float16, D {args.dim}); index "
              f"{index_bytes / args.rows:.0f} B per row")
        print(f"peak RSS {peak:.0f} MiB (after imports {base:.0f} MiB): growth {peak - base:.0f} MiB = "
              f"{(peak - base) / (size / 2**20):.3f} x the TSV size; one shard of {args.shard_size} images in "
              f"float16 is {args.shard_size * 20 * args.dim * 2 / 2**20:.0f} MiB")
    print(f"(max RSS of this parent: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
