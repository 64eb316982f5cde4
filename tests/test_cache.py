"""The HDF5 cache format: round trips, refusals, atomic writes, lazy reads, cache folder names."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import (K_FRAGMENTS, SCHEMA_VERSION, WHOLE_IMAGE_ROW, CacheError, cache_folder, cache_key,
                            describe_folder, list_shards, open_shard, read_region_shard, read_strings,
                            read_triple_shard, shard_name,
                            shard_ranges, write_region_shard, write_shard, write_triple_shard)

PRODUCER = {"backend": "torchvision", "model": "fasterrcnn_mobilenet_v3_large_fpn", "weights": "random",
            "k": K_FRAGMENTS, "dim": 16, "dtype": "float16"}
DATASET = {"name": "demo", "identity": "4d76f4ed0f2cb41e"}
REPO = Path(__file__).resolve().parents[1]


def region_arrays(n: int, d: int = 16, seed: int = 0) -> dict:
    """Fragments of n images, shaped as the schema says, with the whole image in row 0 and some padding."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, K_FRAGMENTS), bool)
    real = rng.integers(0, K_FRAGMENTS, n)  # detections per image
    for i in range(n):
        mask[i, : 1 + real[i]] = True
    hw = rng.integers(100, 1000, (n, 2)).astype(np.int32)
    boxes = rng.uniform(0, 100, (n, K_FRAGMENTS, 4)).astype(np.float32) * mask[..., None]
    boxes[:, WHOLE_IMAGE_ROW] = np.stack([np.zeros(n), np.zeros(n), hw[:, 1], hw[:, 0]], 1)
    scores = rng.uniform(0, 1, (n, K_FRAGMENTS)).astype(np.float32) * mask
    scores[:, WHOLE_IMAGE_ROW] = 1.0
    labels = np.where(mask, rng.integers(1, 91, (n, K_FRAGMENTS)), -1).astype(np.int32)
    labels[:, WHOLE_IMAGE_ROW] = -1
    feats = (rng.standard_normal((n, K_FRAGMENTS, d)) * mask[..., None]).astype(np.float16)
    return {"image_ids": [f"img-{i:05d}.jpg" for i in range(n)], "image_hw": hw, "boxes": boxes,
            "scores": scores, "labels": labels, "mask": mask, "features": feats}


def write_regions(path: Path, arrays: dict, **kw) -> Path:
    opts = {"producer": PRODUCER, "dataset": DATASET, "shard_index": 0, "num_shards": 1} | kw
    return write_region_shard(path, **arrays, **opts)


CAPTIONS = {
    "caption_ids": ["a.jpg#0", "a.jpg#1", "b.jpg#0"],
    "image_ids": ["a.jpg", "a.jpg", "b.jpg"],
    "texts": ["A dog runs on the grass .", "Dogs !", "Un café au lait ."],
    "triples": [[("det", "dog", "a", "dog", "a", 2, 1), ("nsubj", "runs", "dog", "run", "dog", 3, 2),
                 ("obl", "runs", "grass", "run", "grass", 3, 6)],
                [],  # a caption with no triple
                [("amod", "café", "lait", "café", "lait", 2, 4)]],
}


def write_triples(path: Path, captions: dict = CAPTIONS, **kw) -> Path:
    opts = {"producer": {"parser": "stanza", "model": "ewt-small"}, "dataset": DATASET, "shard_index": 0,
            "num_shards": 1} | kw
    return write_triple_shard(path, **captions, **opts)


# ------------------------------------------------------------------------------------------- round trips

def test_region_round_trip(tmp_path):
    arrays = region_arrays(7)
    path = write_regions(tmp_path / shard_name(0), arrays, failed_ids=["gone.jpg"],
                         failed_reasons=["cannot open image: no such file"])
    block = read_region_shard(path, PRODUCER, DATASET)
    assert block.image_ids == arrays["image_ids"]
    for name in ("image_hw", "boxes", "scores", "labels", "mask", "features"):
        got = getattr(block, name)
        assert got.dtype == arrays[name].dtype and np.array_equal(got, arrays[name]), name
    assert block.failed == {"gone.jpg": "cannot open image: no such file"}
    assert read_region_shard(path, with_features=False).features.shape == (7, K_FRAGMENTS, 0)
    with open_shard(path, "regions", PRODUCER, DATASET) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and f.attrs["num_shards"] == 1
        assert json.loads(f.attrs["producer"]) == PRODUCER and "h5py" in json.loads(f.attrs["libraries"])


def test_triple_round_trip_with_empty_captions(tmp_path):
    path = write_triples(tmp_path / shard_name(3), num_tokens=[7, 2, 5], truncated=[False, False, True],
                         failed_ids=["c.jpg#0"], failed_reasons=["parser error"], shard_index=3, num_shards=4)
    block = read_triple_shard(path, {"parser": "stanza", "model": "ewt-small"}, DATASET)
    assert (block.caption_ids, block.image_ids, block.texts) == (CAPTIONS["caption_ids"], CAPTIONS["image_ids"],
                                                                 CAPTIONS["texts"])
    assert block.offsets.tolist() == [0, 3, 3, 4]
    assert block.triples(0) == [("det", "dog", "a"), ("nsubj", "runs", "dog"), ("obl", "runs", "grass")]
    assert block.triples(1) == []
    assert block.triples(2) == [("amod", "café", "lait")]
    assert block.head_lemma == ["dog", "run", "run", "café"] and block.dep_lemma == ["a", "dog", "grass", "lait"]
    assert block.head_pos.tolist() == [2, 3, 3, 2] and block.dep_pos.tolist() == [1, 2, 6, 4]
    assert block.num_tokens.tolist() == [7, 2, 5] and block.truncated.tolist() == [False, False, True]
    assert block.failed == {"c.jpg#0": "parser error"}


def test_empty_shards_round_trip(tmp_path):
    block = read_region_shard(write_regions(tmp_path / "shard-00000.h5", region_arrays(0)))
    assert block.image_ids == [] and block.features.shape == (0, K_FRAGMENTS, 16) and block.failed == {}
    no_triples = {"caption_ids": ["a#0", "a#1"], "image_ids": ["a", "a"], "texts": ["Hi .", "Oh ."],
                  "triples": [[], []]}
    block = read_triple_shard(write_triples(tmp_path / "shard-00001.h5", no_triples))
    assert block.offsets.tolist() == [0, 0, 0] and block.rel == [] and block.triples(1) == []
    block = read_triple_shard(write_triples(tmp_path / "shard-00002.h5",
                                            {"caption_ids": [], "image_ids": [], "texts": [], "triples": []}))
    assert block.caption_ids == [] and block.offsets.tolist() == [0]


def test_writers_refuse_wrong_shapes(tmp_path):
    arrays = region_arrays(3)
    arrays["boxes"] = arrays["boxes"][:, :19]
    with pytest.raises(ValueError, match=r"boxes has shape"):
        write_regions(tmp_path / "shard-00000.h5", arrays)
    with pytest.raises(ValueError, match=r"differ in length"):
        write_triples(tmp_path / "shard-00000.h5", CAPTIONS | {"texts": ["one"]})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- refusals

def test_refusals_name_both_values(tmp_path):
    path = write_regions(tmp_path / "shard-00000.h5", region_arrays(2))
    other = PRODUCER | {"weights": "COCO_V1"}
    with pytest.raises(CacheError, match=r'produced by .*"weights":"random".* asked for .*"weights":"COCO_V1"'):
        read_region_shard(path, other, DATASET)
    with pytest.raises(CacheError, match=r'belongs to dataset .*4d76f4ed0f2cb41e.* asked for .*"identity":"x"'):
        read_region_shard(path, PRODUCER, DATASET | {"identity": "x"})
    with pytest.raises(CacheError, match=r"holds 'regions', expected 'triples'"):
        read_triple_shard(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CacheError, match=rf"schema version {SCHEMA_VERSION + 1}, this defrag reads {SCHEMA_VERSION}"):
        read_region_shard(path)


def test_refusals_of_missing_damaged_and_foreign_files(tmp_path):
    with pytest.raises(CacheError, match=r"shard-00009.h5 does not exist"):
        read_region_shard(tmp_path / "shard-00009.h5")
    damaged = tmp_path / "shard-00000.h5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CacheError, match=r"shard-00000.h5 cannot be read"):
        read_region_shard(damaged)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CacheError, match=r"foreign.h5: not a defrag cache shard \(attribute 'kind' missing\)"):
        read_region_shard(tmp_path / "foreign.h5")


# ------------------------------------------------------------------------------------------- atomic writes

def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = write_regions(tmp_path / "shard-00000.h5", region_arrays(4, seed=1))
    before = path.read_bytes()
    # `features` fails half-way through the file (after image_ids and friends were written).
    arrays = region_arrays(4, seed=2) | {"features": [[1.0, 2.0], [3.0]]}
    with pytest.raises(ValueError):
        write_shard(path, "regions", arrays, producer=PRODUCER, dataset=DATASET, shard_index=0, num_shards=1)
    with pytest.raises(ValueError):
        write_shard(tmp_path / "shard-00001.h5", "regions", arrays, producer=PRODUCER, dataset=DATASET,
                    shard_index=1, num_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5"]
    assert path.read_bytes() == before


def test_a_killed_write_leaves_no_finished_shard(tmp_path):
    """SIGKILL while the shard is being written: only a hidden temporary file remains, and it is never listed."""
    marker = tmp_path / "features-written"
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import h5py
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from pipeline.cache import write_region_shard
        from test_cache import region_arrays, PRODUCER, DATASET

        import os
        def pause_before_rename(fd):  # the temporary file is written, not yet synced and renamed
            Path({str(marker)!r}).touch()
            time.sleep(120)
        os.fsync = pause_before_rename

        write_region_shard({str(tmp_path / shard_name(0))!r}, **region_arrays(500, d=64), producer=PRODUCER,
                           dataset=DATASET, shard_index=0, num_shards=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "the writer never reached the last field"
            time.sleep(0.05)
        temps = list(tmp_path.glob(".shard-00000.h5.tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / shard_name(0)).exists()
    assert list_shards(tmp_path) == []
    # The rerun writes the shard beside the leftover temporary file.
    write_regions(tmp_path / shard_name(0), region_arrays(5))
    assert list_shards(tmp_path) == [tmp_path / shard_name(0)]
    assert len(read_region_shard(list_shards(tmp_path)[0]).image_ids) == 5


def test_list_shards_is_sorted_and_skips_temporary_files(tmp_path):
    for i in (2, 0, 1):
        write_triples(tmp_path / shard_name(i), shard_index=i, num_shards=3)
    (tmp_path / ".shard-00003.h5.tmp-123").write_bytes(b"partial")
    (tmp_path / "cache.json").write_text("{}")
    assert list_shards(tmp_path) == [tmp_path / shard_name(i) for i in range(3)]
    assert list_shards(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------- lazy reads

class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes HDF5 reads through it."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.bytes_read += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def test_one_image_is_read_without_the_whole_shard(tmp_path):
    n, d = 10_000, 32
    arrays = region_arrays(n, d)
    path = write_regions(tmp_path / shard_name(0), arrays, producer=PRODUCER | {"dim": d})
    size = path.stat().st_size
    assert size > n * K_FRAGMENTS * d * 2  # the features alone: 12.8 MB
    i = 7_321
    with open_shard(path, "regions", PRODUCER | {"dim": d}, DATASET) as f:
        feats = f["features"]
        assert feats.chunks is not None and feats.chunks[1:] == (K_FRAGMENTS, d)
        assert feats.chunks[0] * K_FRAGMENTS * d * 2 <= 256 * 1024  # one chunk holds a few hundred images at most
        assert np.array_equal(feats[i], arrays["features"][i])
        assert np.array_equal(f["boxes"][i], arrays["boxes"][i]) and f["mask"][i].tolist() == arrays["mask"][i].tolist()
        assert read_strings(f["image_ids"])[i] == arrays["image_ids"][i]
    # Count the bytes HDF5 actually reads to fetch that image's fragments.
    with CountingFile(path) as raw, h5py.File(raw, "r") as f:
        opened = raw.bytes_read
        row = f["features"][i]
        one_image = raw.bytes_read - opened
        assert np.array_equal(row, arrays["features"][i])
    assert one_image <= 300 * 1024 and one_image < size / 40, (one_image, size)


# ------------------------------------------------------------------------------------------- names and folders

def test_cache_key_is_stable_across_dict_order():
    a = {"producer": PRODUCER, "dataset": DATASET, "shard_size": 1000}
    b = {"shard_size": 1000, "dataset": dict(reversed(DATASET.items())), "producer": dict(reversed(PRODUCER.items()))}
    assert cache_key(a) == cache_key(b) and len(cache_key(a)) == 12
    assert cache_key(a) != cache_key(a | {"shard_size": 999})
    assert cache_key(a, length=20).startswith(cache_key(a))


def test_cache_folder_is_named_by_content_and_describes_it(tmp_path):
    content = {"producer": PRODUCER, "dataset": DATASET, "shard_size": 1000}
    folder = cache_folder(tmp_path, "regions", "demo", content)
    assert folder == tmp_path / "regions" / f"demo-{cache_key(content)}"
    assert not folder.exists()  # naming a folder (scheduling, preflight) writes nothing
    describe_folder(folder)
    assert json.loads((folder / "cache.json").read_text()) == content
    assert cache_folder(tmp_path, "regions", "demo", dict(reversed(content.items()))) == folder
    other = cache_folder(tmp_path, "regions", "demo", content | {"shard_size": 500})
    assert other != folder and other.parent == folder.parent
    assert cache_folder(tmp_path, "triples", "my data/set v2.jsonl", content).name.startswith("set_v2-")
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_shard_names_and_ranges():
    assert shard_name(0) == "shard-00000.h5" and shard_name(123) == "shard-00123.h5"
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(0, 4) == []
    with pytest.raises(ValueError, match="shard size must be >= 1"):
        shard_ranges(10, 0)
