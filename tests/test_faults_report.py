"""Reports and retrieval pictures read images only from inside the image root, under collision-free names."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from model.report import build_report, report_images
from model.retrieve import main as retrieve_main
from model.runs import file_stem, open_run
from small_run import build_small_run

DEMO = "data/demo/images"


def test_file_stems_never_collide():
    prefix = "p" * 90
    ids = ["a/b.jpg", "a_b.jpg", "a b.jpg", "a?b.jpg", prefix + "1.jpg", prefix + "2.jpg", "", ".", "..", "é.jpg"]
    stems = [file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert all("/" not in s and s not in (".", "..") and len(s) < 100 for s in stems)
    assert file_stem("a", "b/c") != file_stem("a/b", "c") and file_stem("a/b.jpg") == file_stem("a/b.jpg")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return build_small_run(tmp_path_factory.mktemp("small-run"))


@pytest.fixture
def hostile_root(tmp_path):
    """A copy of the demo images where the test image retina.jpg is a symlink to a photo outside the root."""
    root, outside = tmp_path / "images", tmp_path / "outside"
    shutil.copytree(DEMO, root)
    outside.mkdir()
    Image.new("RGB", (64, 48), (255, 0, 255)).save(outside / "secret.jpg")
    (root / "retina.jpg").unlink()
    os.symlink(outside / "secret.jpg", root / "retina.jpg")
    return root


def test_report_refuses_images_linked_out_of_the_root(run_folder, hostile_root, tmp_path):
    run = open_run(run_folder, dataset="demo", image_root=str(hostile_root))
    index = build_report(run, "test", out_dir=tmp_path / "report", n_queries=2, top=2)
    folder = index.parent
    thumbs = sorted((folder / "images").iterdir())
    assert len(thumbs) == 1  # the other test image; nothing from outside the root
    for t in thumbs:
        with Image.open(t) as im:
            assert np.asarray(im.convert("RGB"))[..., 1].mean() > 20  # not the magenta secret
    assert "(no image file)" in index.read_text()
    assert all((folder / s).is_file() for s in report_images(index))
    drawn = [p.name.split("-", 1)[1] for p in (folder / "align").iterdir()]  # <tag>-<image>-<caption>-<hash>
    assert drawn and not any(d.startswith("retina.jpg-") for d in drawn)


def test_retrieve_explain_refuses_an_image_linked_out_of_the_root(run_folder, hostile_root, tmp_path, capsys):
    out = tmp_path / "pair.png"
    code = retrieve_main(["--run", str(run_folder), "--dataset", "demo", "--image-root", str(hostile_root),
                          "--image", "retina.jpg", "--explain", str(out)])
    assert code == 2 and not out.exists()
    assert "outside the image root" in capsys.readouterr().err


def test_a_report_without_any_picture_says_so(run_folder, tmp_path, caplog):
    (tmp_path / "empty").mkdir()  # a wrong --image-root: scoring works, the pictures cannot
    run = open_run(run_folder, dataset="demo", image_root=str(tmp_path / "empty"))
    with caplog.at_level("WARNING", logger="model.report"):
        index = build_report(run, "test", out_dir=tmp_path / "report", n_queries=2, top=2)
    assert index.is_file() and "no image of the test split is in the image folder" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.report"):
        build_report(open_run(run_folder, dataset="demo"), "test", out_dir=tmp_path / "ok", n_queries=2, top=2)
    assert "no image of the test split" not in caplog.text
