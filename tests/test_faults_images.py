"""Hostile and careless image inputs: symlinks out of the image root, thin images, long paths, a detector that
fails on one image. Each is recorded for its image; the rest of the shard is written."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cache
from pipeline.images import ImageLoadError, load_image, open_inside, read_picture
from pipeline.regions import RegionConfig, detector_for, extract_shard

DEMO = "data/demo/images"
CFG = RegionConfig("torchvision-mobilenet-v3-fpn", "random", seed=0, max_image_side=256, min_size=128, max_size=192)


@pytest.fixture(scope="module")
def det():
    torch.set_num_threads(1)
    return detector_for(CFG, "cpu")


@pytest.fixture
def tree(tmp_path):
    """<tmp>/root (the image root) and <tmp>/outside, with links out of and inside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(f"{DEMO}/coins.png", root / "inside.png")
    shutil.copy(f"{DEMO}/rocket.jpg", outside / "secret.jpg")
    shutil.copy(f"{DEMO}/camera.png", outside / "cat.png")
    os.symlink(outside / "secret.jpg", root / "secret.jpg")  # a file link out of the root
    os.symlink(outside, root / "linkdir")  # a directory link out of the root
    os.symlink("/etc/hostname", root / "hostname.jpg")
    os.symlink("../inside.png", root / "sub" / "alias.png")  # stays inside: fine
    os.symlink(root / "sub", root / "subdir")  # a directory link that stays inside: fine
    os.symlink(tmp_path / "root-alias", root / "loop.png")
    os.symlink(root / "loop.png", tmp_path / "root-alias")
    os.mkfifo(root / "fifo.png")
    return root


OUT_OF_ROOT = ["secret.jpg", "linkdir/cat.png", "hostname.jpg"]


@pytest.mark.parametrize("rel", OUT_OF_ROOT)
def test_symlinks_out_of_the_root_are_refused(tree, rel):
    with pytest.raises(ImageLoadError, match="outside the image root"):
        load_image(tree / rel, 64, root=tree)
    with pytest.raises(ImageLoadError, match="outside the image root"):
        read_picture(tree / rel, tree)


def test_symlinks_inside_the_root_work_and_a_linked_root_too(tree, tmp_path):
    a = load_image(tree / "inside.png", 64, root=tree).tensor
    assert torch.equal(load_image(tree / "sub/alias.png", 64, root=tree).tensor, a)
    assert torch.equal(load_image(tree / "subdir/alias.png", 64, root=tree).tensor, a)
    os.symlink(tree, tmp_path / "root-link")  # the root itself reached through a link
    assert torch.equal(load_image(tmp_path / "root-link/inside.png", 64, root=tmp_path / "root-link").tensor, a)


@pytest.mark.parametrize("rel, reason", [("fifo.png", "not a regular file"), ("loop.png", "symbolic links"),
                                         ("sub", "not a regular file"), ("nope.png", "not found")])
def test_special_files_are_refused_without_blocking(tree, rel, reason):
    with pytest.raises(ImageLoadError, match=reason):
        open_inside(tree, rel)


def test_long_path_is_an_image_failure_not_an_oserror(tmp_path):
    for rel in ["a" * 5000 + ".jpg", "/".join(["d" * 200] * 30) + "/x.jpg"]:
        with pytest.raises(ImageLoadError, match="too long"):
            load_image(tmp_path / rel, 64, root=tmp_path)


def test_the_opened_file_is_the_checked_one(tree, monkeypatch):
    """No check-then-open window: swapping the link between a path check and the open changes nothing,
    because the verdict is taken from the open descriptor."""
    real_open = os.open

    def swap_then_open(path, *a, **kw):
        if str(path).endswith("inside.png"):
            os.replace(tree / "secret.jpg", tree / "inside.png")  # now a link out of the root
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", swap_then_open)
    with pytest.raises(ImageLoadError, match="outside the image root"):
        open_inside(tree, "inside.png")


def test_shard_records_links_out_thin_images_and_long_paths(det, tree, tmp_path):
    for name, size in [("wide.png", (10_000, 1)), ("tall.png", (1, 10_000)), ("strip.png", (1400, 1))]:
        Image.new("RGB", size, (30, 160, 90)).save(tree / name)
    items = [(rel, tree / rel) for rel in ["inside.png", *OUT_OF_ROOT, "wide.png", "tall.png", "strip.png",
                                           "x" * 5000 + ".jpg", "sub/alias.png"]]
    out = tmp_path / "shard-00000.h5"
    report = extract_shard(items, out, det, producer=CFG.producer(), dataset={"name": "t"}, shard_index=0,
                           num_shards=1, max_image_side=CFG.max_image_side, batch_size=3, image_root=tree)
    b = cache.read_region_shard(out)
    assert b.image_ids == ["inside.png", "wide.png", "tall.png", "strip.png", "sub/alias.png"]
    assert set(b.failed) == {*OUT_OF_ROOT, "x" * 5000 + ".jpg"} and b.failed == report.failed
    assert all("outside the image root" in b.failed[r] for r in OUT_OF_ROOT)
    assert "too long" in b.failed["x" * 5000 + ".jpg"]
    assert b.image_hw[1:4].tolist() == [[1, 10_000], [10_000, 1], [1, 1400]]
    for i, (h, w) in enumerate(b.image_hw):  # every image has its whole-image row, boxes in its own pixels
        assert b.mask[i, 0] and b.boxes[i, 0].tolist() == [0, 0, w, h]
        assert (b.boxes[i, b.mask[i], 2] <= w + 1e-2).all() and (b.boxes[i, b.mask[i], 3] <= h + 1e-2).all()
        assert np.isfinite(b.features[i]).all() and np.abs(b.features[i, 0]).sum() > 0


class _Flaky:
    """A real detector that raises on one poisoned image (in a batch or alone), as a bad input would."""

    def __init__(self, det, poison_width: int):
        self.det, self.poison_width, self.calls = det, poison_width, []

    def extract(self, tensors):
        self.calls.append(len(tensors))
        if any(t.shape[2] == self.poison_width for t in tensors):
            raise RuntimeError("Input and output sizes should be greater than 0")
        return self.det.extract(tensors)


def test_a_failing_batch_is_retried_one_by_one(det, tmp_path):
    for name, size in [("a.png", (60, 40)), ("b.png", (60, 40)), ("c.png", (61, 40)), ("d.png", (60, 40))]:
        Image.new("RGB", size, (len(name) * 40, 90, 10)).save(tmp_path / name)
    flaky = _Flaky(det, poison_width=61)
    items = [(n, tmp_path / n) for n in ["a.png", "b.png", "c.png", "d.png"]]
    report = extract_shard(items, tmp_path / "shard-00000.h5", flaky, producer=CFG.producer(), dataset={},
                           shard_index=0, num_shards=1, max_image_side=256, batch_size=4, image_root=tmp_path)
    assert list(report.failed) == ["c.png"] and "sizes should be greater than 0" in report.failed["c.png"]
    assert cache.read_region_shard(tmp_path / "shard-00000.h5").image_ids == ["a.png", "b.png", "d.png"]


def test_a_detector_that_fails_everything_fails_the_shard_unwritten(det, tmp_path):
    from pipeline.regions import RegionExtractionError

    for n in ("a.png", "b.png"):
        Image.new("RGB", (61, 40)).save(tmp_path / n)
    with pytest.raises(RegionExtractionError, match="failed on all 2 images"):
        extract_shard([(n, tmp_path / n) for n in ("a.png", "b.png")], tmp_path / "shard-00000.h5",
                      _Flaky(det, 61), producer=CFG.producer(), dataset={}, shard_index=0, num_shards=1,
                      max_image_side=256, image_root=tmp_path)
    assert not (tmp_path / "shard-00000.h5").exists()
