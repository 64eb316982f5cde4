"""Damaged caches and hostile disks: a flipped byte inside a shard's features, a truncated shard, a full disk and
a read-only folder. Damage is named (shard and fix) or recomputed; a full disk is one line, never a segfault."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import luigi
import numpy as np
import pytest

from pipeline import cache
from pipeline.cache import CacheError, read_region_shard, shard_complete, shard_name, write_region_shard
from pipeline.verify import main as verify_main
from pipeline.verify import verify_cache

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests/stanza_models"
REGIONS = dict(detector="torchvision-mobilenet-v3-fpn", detector_weights="random", max_image_side=256,
               min_size=128, max_size=192, device="cpu")


def _regions(path: Path, n: int = 50, d: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_region_shard(
        path, image_ids=[f"img{i}.jpg" for i in range(n)], image_hw=np.full((n, 2), 100),
        boxes=rng.uniform(0, 100, (n, 20, 4)), scores=rng.uniform(0, 1, (n, 20)), labels=np.ones((n, 20)),
        mask=np.ones((n, 20), bool), features=rng.normal(size=(n, 20, d)).astype(np.float16),
        producer={"p": 1}, dataset={"d": 1}, shard_index=0, num_shards=1)


def _flip_inside_features(path: Path, nbytes: int = 400) -> None:
    with h5py.File(path, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset + 100)
        old = fh.read(nbytes)
        fh.seek(chunk.byte_offset + 100)
        fh.write(bytes(255 - b for b in old))  # every bit flipped


def test_flipped_bytes_in_features_are_named_not_read_as_data(tmp_path, capsys):
    path = _regions(tmp_path / "regions" / "x" / shard_name(0))
    _regions(tmp_path / "regions" / "y" / shard_name(0), seed=1)
    assert verify_main([str(tmp_path)]) == 0
    _flip_inside_features(path)
    with pytest.raises(CacheError, match=rf"{path.name} cannot be read: damaged .* delete it and rerun"):
        read_region_shard(path)
    report = verify_cache(tmp_path)
    assert report.shards == 2 and list(report.damaged) == [str(path)] and "features" in report.damaged[str(path)]
    capsys.readouterr()
    assert verify_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {path}" in out and "1 damaged" in out and "rerun" in out
    assert verify_main([str(tmp_path / "nope")]) == 2


def test_training_store_names_the_damaged_shard(tmp_path):
    from model.store import _load_features

    path = _regions(tmp_path / shard_name(0))
    _flip_inside_features(path)
    with pytest.raises(CacheError, match=rf"{path.name} cannot be read: damaged"):
        _load_features([path], 50, 20, 64)


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "shards"])
def test_streamed_features_name_the_damaged_shard(tmp_path, by_rows):
    import torch

    from model.store import ShardFeatures

    good, bad = _regions(tmp_path / shard_name(0)), _regions(tmp_path / shard_name(1), seed=1)
    _flip_inside_features(bad)
    feats = ShardFeatures([good, bad], np.repeat([0, 1], 50), np.tile(np.arange(50), 2), [50 * 20 * 64 * 2] * 2,
                          max_bytes=0, by_rows=by_rows)
    assert feats.get(torch.tensor([3, 49])).shape == (2, 20, 64)  # the good shard reads
    with pytest.raises(CacheError, match=rf"{bad.name} cannot be read: damaged .* delete it and rerun"):
        feats.get(torch.tensor([3, 50]))
    if by_rows:  # read ahead in the background: the error comes with the rows, and other rows still read
        feats.prefetch(torch.tensor([50, 3]))
        assert feats.get(torch.tensor([49])).shape == (1, 20, 64)
        feats.prefetch(torch.tensor([50, 3]))
        with pytest.raises(CacheError, match=rf"{bad.name} cannot be read: damaged"):
            feats.get(torch.tensor([50, 3]))
        feats.close()


@pytest.mark.parametrize("cut", [1, 4096, "half"])
def test_truncated_or_unfinished_shards_are_not_complete(tmp_path, cut):
    path = _regions(tmp_path / shard_name(0))
    assert shard_complete(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if cut == "half" else len(data) - cut])
    assert not shard_complete(path)
    assert list(verify_cache(tmp_path).damaged) == [str(path)]
    with pytest.raises(CacheError, match="cannot be read"):
        read_region_shard(path)
    _regions(path)
    with h5py.File(path, "a") as f:  # a shard without its completion record (e.g. an older writer's)
        del f.attrs["complete"]
    assert not shard_complete(path)


def _build(task) -> bool:
    return luigi.build([task], local_scheduler=True, log_level="WARNING")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])


def test_extract_regions_recomputes_a_truncated_shard_despite_its_summary(tmp_path):
    from tasks import ExtractRegions

    task = ExtractRegions(dataset="demo", cache_dir=str(tmp_path), shard_size=7, **REGIONS)
    assert _build(task)
    shards = cache.list_shards(task.region_folder())
    before = read_region_shard(shards[1])
    _truncate(shards[1])
    assert task.output().exists() and not task.complete()
    assert _build(task) and task.complete()
    after = read_region_shard(shards[1])
    assert after.image_ids == before.image_ids and np.array_equal(after.features, before.features)


def test_parse_sentences_recomputes_a_truncated_shard(tmp_path):
    from tasks import ParseSentences

    task = ParseSentences(dataset="demo", cache_dir=str(tmp_path), shard_size=40,
                          stanza_tagger=str(MODELS / "en_ewt_tagger_small.pt"),
                          stanza_parser=str(MODELS / "en_ewt_parser_small.pt"), device="cpu")
    assert _build(task)
    shard = cache.list_shards(task.triple_folder())[0]
    texts = cache.read_triple_shard(shard).texts
    _truncate(shard)
    assert not task.complete()
    assert _build(task) and task.complete() and cache.read_triple_shard(shard).texts == texts


# ------------------------------------------------------------------------------------------- full and read-only

@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs mount permission); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here (the injected-error tests cover the same paths)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


WRITE_ON_FULL_DISK = """
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from pipeline.cache import CacheError
    from test_faults_cache import _regions
    try:
        _regions(__import__("pathlib").Path({target!r}), n=100, d=256)
    except CacheError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
"""


def test_full_disk_is_one_line_with_the_space_needed_no_segfault_no_temporary_file(tiny_disk):
    target = tiny_disk / "regions" / shard_name(0)
    child = textwrap.dedent(WRITE_ON_FULL_DISK).format(root=str(ROOT), tests=str(ROOT / "tests"), target=str(target))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr  # caught and reported; 139 was the old segfault at exit
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(tiny_disk / "regions") in err
    assert "no space left" in err and "(1.0 MB free)" in err and "--cache-dir" in err
    assert not [p for p in tiny_disk.rglob("*") if p.is_file()]  # no temporary file, no partial shard


def test_read_only_folder_is_one_line_naming_it(tiny_disk):
    _regions(tiny_disk / "regions" / "keep.h5", n=2, d=4)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(CacheError, match=rf"{tiny_disk / 'regions'}: cannot write shard-00000.h5.*read-only.*"
                                         "writable"):
        _regions(tiny_disk / "regions" / shard_name(0), n=2, d=4)
    with pytest.raises(CacheError, match=rf"{tiny_disk / 'cache' / 'regions'}: cannot write a folder.*read-only"):
        cache.write_text_atomic(tiny_disk / "cache" / "regions" / "summary.json", "{}")
    assert sorted(p.name for p in (tiny_disk / "regions").iterdir()) == ["keep.h5"]


def test_injected_enospc_during_the_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """The same as a real full disk where mount is not permitted: the error arrives at the write."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CacheError, match=r"cannot write shard-00000.h5 \(\d[^)]*B\): no space left .*free at least"):
        _regions(tmp_path / shard_name(0))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(cache, "_free_bytes", lambda folder: 10_000)  # the estimate refuses before writing
    with pytest.raises(CacheError, match=r"\(\d[^)]*B\): no space left on the device \(10.0 kB free\)"):
        _regions(tmp_path / shard_name(0))
    assert list(tmp_path.iterdir()) == []


def test_injected_read_only_error(tmp_path, monkeypatch):
    real_open = open

    def read_only(path, mode="r", *a, **kw):
        if "w" in mode and ".tmp-" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(CacheError, match=rf"{tmp_path}: cannot write shard-00000.h5 .*the folder is read-only"):
        _regions(tmp_path / shard_name(0))
    monkeypatch.undo()
    assert json.dumps([p.name for p in tmp_path.iterdir()]) == "[]"
