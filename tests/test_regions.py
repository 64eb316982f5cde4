"""Region extraction with a real (random-weight) torchvision detector: selection, layout, shards, failures."""
from __future__ import annotations

import shutil
import socket
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from pipeline import cache
from pipeline.detectors import DetectorError, build_detector, describe_detector, file_sha256
from pipeline.detectors.select import select_detections
from pipeline.images import load_image
from pipeline.regions import (RegionConfig, RegionExtractionError, detector_for, extract_shard, layout_fragments,
                              region_cache_folder)

# The generated 10,000 x 10,000 image is over Pillow's warning size (it still decodes it).
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
DEMO = "data/demo/images"
PHOTOS = ["astronaut.png", "rocket.jpg", "coins.png"]
# Small inputs keep a random MobileNet-v3 FPN at a fraction of a second per image on a busy 2-core machine.
CFG = RegionConfig("torchvision-mobilenet-v3-fpn", "random", seed=0, max_image_side=256, min_size=128, max_size=192)


@pytest.fixture(scope="module")
def det():
    torch.set_num_threads(1)
    return detector_for(CFG, "cpu")


@pytest.fixture(scope="module")
def photos():
    return [load_image(f"{DEMO}/{f}", CFG.max_image_side) for f in PHOTOS]


@pytest.fixture(scope="module")
def results(det, photos):
    return det.extract([p.tensor for p in photos])


# ------------------------------------------------------------------------------------------ selection

def _roi_heads(num_classes: int) -> RoIHeads:
    rh = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh=0.0, nms_thresh=0.5,
                  detections_per_img=10_000)
    return rh


def test_select_matches_torchvision_postprocess_single_class():
    """With one foreground class there is nothing to deduplicate: the result must be torchvision's own."""
    g = torch.Generator().manual_seed(1)
    props = torch.rand(300, 2, generator=g) * 100
    props = torch.cat([props, props + 5 + torch.rand(300, 2, generator=g) * 60], 1)
    logits, deltas = torch.randn(300, 2, generator=g), torch.randn(300, 8, generator=g) * 0.3
    rh = _roi_heads(2)
    rh.detections_per_img = 19
    tb, ts, tl = (x[0] for x in rh.postprocess_detections(logits, deltas, [props], [(120, 150)]))
    boxes = box_ops.clip_boxes_to_image(rh.box_coder.decode(deltas, [props]), (120, 150))
    b, s, c, _ = select_detections(boxes[:, 1:], torch.softmax(logits, -1)[:, 1:], 19, 0.5, start=4)
    assert torch.equal(b, tb) and torch.equal(s, ts) and torch.equal(c + 1, tl) and len(b) == 19


def test_select_is_torchvision_nms_then_one_per_proposal():
    """Many classes: torchvision keeps a proposal once per class; we keep its best class only."""
    g = torch.Generator().manual_seed(2)
    num_p, num_c = 200, 6
    props = torch.rand(num_p, 2, generator=g) * 100
    props = torch.cat([props, props + 5 + torch.rand(num_p, 2, generator=g) * 60], 1)
    logits = torch.randn(num_p, num_c + 1, generator=g)
    deltas = torch.zeros(num_p, (num_c + 1) * 4)  # every class box is the proposal: box identifies proposal
    rh = _roi_heads(num_c + 1)
    tb, ts, tl = (x[0] for x in rh.postprocess_detections(logits, deltas, [props], [(200, 200)]))
    first = {}
    for i, box in enumerate(map(tuple, tb.tolist())):
        first.setdefault(box, i)
    want = sorted(first.values())[:19]
    boxes = box_ops.clip_boxes_to_image(rh.box_coder.decode(deltas, [props]), (200, 200))[:, 1:]
    for start in (1, 19, 10_000):  # growing the candidate prefix gives the same answer as NMS over all
        b, s, c, p = select_detections(boxes, torch.softmax(logits, -1)[:, 1:], 19, 0.5, start=start)
        assert torch.equal(b, tb[want]) and torch.equal(s, ts[want]) and torch.equal(c + 1, tl[want])
        assert len(set(p.tolist())) == len(p) == 19


def test_select_returns_fewer_when_there_are_fewer_proposals():
    boxes = torch.tensor([[[0.0, 0, 10, 10]], [[50.0, 50, 60, 60]]]).expand(2, 3, 4)
    b, s, c, p = select_detections(boxes, torch.full((2, 3), 0.2), 19, 0.5)
    assert len(b) == 2 and sorted(p.tolist()) == [0, 1]
    b, *_ = select_detections(boxes[:0], torch.zeros(0, 3), 19, 0.5)
    assert b.shape == (0, 4)


# ------------------------------------------------------------------------------------------ layout

def test_layout_whole_image_row_sorted_detections_and_padding():
    boxes = np.array([[1, 1, 5, 5], [2, 2, 8, 8], [0, 0, 3, 3]], np.float32)
    scores = np.array([0.2, 0.9, 0.5], np.float32)
    feats = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    out = layout_fragments(30, 40, boxes, scores, np.array([7, 8, 9]), feats, np.full(4, -1.0))
    w = cache.WHOLE_IMAGE_ROW
    assert out["boxes"][w].tolist() == [0, 0, 40, 30] and out["scores"][w] == 1 and out["labels"][w] == -1
    assert out["features"][w].tolist() == [-1.0] * 4
    assert out["scores"][1:4].tolist() == pytest.approx([0.9, 0.5, 0.2]) and out["labels"][1:4].tolist() == [8, 9, 7]
    assert out["features"][1].tolist() == feats[1].tolist() and out["boxes"][3].tolist() == [1, 1, 5, 5]
    assert out["mask"].tolist() == [True] * 4 + [False] * 16
    assert not out["features"][4:].any() and not out["boxes"][4:].any() and (out["labels"][4:] == -1).all()


def test_layout_keeps_only_the_best_nineteen():
    n = 25
    scores = np.random.default_rng(0).random(n).astype(np.float32)
    out = layout_fragments(10, 10, np.zeros((n, 4)), scores, np.arange(n), np.eye(n, 3), np.zeros(3))
    assert out["mask"].all() and out["scores"][1:].tolist() == pytest.approx(sorted(scores)[::-1][:19])


# ------------------------------------------------------------------------------------------ the detector

def test_extract_shapes_order_and_boxes_inside(results, photos):
    for r, p in zip(results, photos):
        h, w = p.tensor.shape[1:]
        assert r.boxes.shape == (19, 4) and r.features.shape == (19, 1024) and r.whole.shape == (1024,)
        assert (r.scores[:-1] >= r.scores[1:]).all()
        assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= w + 1e-3).all() and (r.boxes[:, 3] <= h + 1e-3).all()
        assert torch.isfinite(r.features).all() and r.features.std(0).mean() > 0  # regions differ
        assert torch.isfinite(r.whole).all() and r.whole.abs().sum() > 0


def test_features_come_from_the_detection_pass(det, results, photos):
    """Pooling the returned boxes again, by hand, from one backbone pass gives the returned features."""
    im = photos[0].tensor
    model, rh = det.model, det.model.roi_heads
    with torch.inference_mode():
        batch, _ = model.transform([im])
        feats = model.backbone(batch.tensors)
        (h, w), = batch.image_sizes
        scale = torch.tensor([w / im.shape[2], h / im.shape[1]] * 2)
        boxes = torch.cat([results[0].boxes * scale, torch.tensor([[0.0, 0, w, h]])])
        pooled = rh.box_head(rh.box_roi_pool(feats, [boxes], batch.image_sizes))
    torch.testing.assert_close(pooled[-1], results[0].whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled[:-1], results[0].features, rtol=1e-3, atol=1e-3)


def test_features_do_not_depend_on_batch_neighbours(det, photos, results):
    camera = load_image(f"{DEMO}/camera.png", CFG.max_image_side).tensor  # same size as the astronaut
    together = det.extract([photos[0].tensor, camera, photos[1].tensor])
    alone = det.extract([camera])[0]
    for got, want in [(together[0], results[0]), (together[1], alone), (together[2], results[1])]:
        # Batched convolutions round differently (~1e-4 of the feature scale); padding changed them by ~100.
        torch.testing.assert_close(got.features, want.features, rtol=1e-3, atol=0.05)
        torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-3, atol=0.05)


def test_same_seed_same_output_other_seed_other_weights(det, photos, results):
    again = build_detector("torchvision-mobilenet-v3-fpn", "random", "cpu", seed=0, min_size=128, max_size=192)
    r = again.extract([photos[0].tensor])[0]
    assert torch.equal(r.boxes, results[0].boxes) and torch.equal(r.features, results[0].features)
    other = describe_detector("torchvision-mobilenet-v3-fpn", "random", seed=1, min_size=128, max_size=192)
    assert other["seed"] == 1 and other != det.describe()


def test_local_weights_file_loads_and_is_identified_by_sha256(det, photos, results, tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save({"model": det.model.state_dict()}, path)
    loaded = build_detector("torchvision-mobilenet-v3-fpn", str(path), "cpu", min_size=128, max_size=192)
    d = loaded.describe()
    assert d["weights"] == "file" and d["weights_sha256"] == file_sha256(path) and "seed" not in d
    r = loaded.extract([photos[0].tensor])[0]
    torch.testing.assert_close(r.features, results[0].features)
    bad = tmp_path / "notes.pt"
    bad.write_text("not weights")
    with pytest.raises(DetectorError, match="notes.pt"):
        build_detector("torchvision-mobilenet-v3-fpn", str(bad), "cpu")


def test_unknown_detector_and_missing_weights_file_name_the_choices():
    with pytest.raises(DetectorError, match="torchvision-mobilenet-v3-fpn"):
        describe_detector("yolo")
    with pytest.raises(DetectorError, match="pretrained"):
        describe_detector("torchvision-r50-fpn-v2", "/no/such/weights.pth")


def test_pretrained_offline_fails_fast_naming_the_alternatives(tmp_path, monkeypatch):
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        pytest.skip("download.pytorch.org is reachable here: the offline failure cannot be exercised")
    except OSError:
        pass
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    t = time.monotonic()
    with pytest.raises(DetectorError, match=r"--detector-weights PATH.*--detector-weights random"):
        build_detector("torchvision-mobilenet-v3-fpn", "pretrained", "cpu")
    assert time.monotonic() - t < 15


# ------------------------------------------------------------------------------------------ shards

@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """Real photos plus the awkward cases: 1x1, very large, grey, CMYK, and three bad files."""
    d = tmp_path_factory.mktemp("mixed")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    Image.new("L", (10_000, 10_000), 90).save(d / "big.png", compress_level=1)
    Image.open(f"{DEMO}/camera.png").convert("L").save(d / "grey.png")
    Image.open(f"{DEMO}/rocket.jpg").convert("CMYK").save(d / "cmyk.jpg")
    (d / "text.jpg").write_text("hello")
    (d / "cut.jpg").write_bytes(open(f"{DEMO}/rocket.jpg", "rb").read()[:3000])
    ids = ["astronaut", "one", "text", "big", "grey", "missing", "cut", "cmyk"]
    paths = [f"{DEMO}/astronaut.png", d / "one.png", d / "text.jpg", d / "big.png", d / "grey.png",
             d / "missing.jpg", d / "cut.jpg", d / "cmyk.jpg"]
    return list(zip(ids, paths))


def _write(det, items, path, **kw):
    return extract_shard(items, path, det, producer=CFG.producer(), dataset={"name": "t"}, shard_index=0,
                         num_shards=1, max_image_side=CFG.max_image_side, batch_size=3, **kw)


def test_shard_records_failures_and_writes_the_rest(det, mixed_images, tmp_path):
    seen = []
    report = _write(det, mixed_images, tmp_path / "shard-00000.h5", progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (8, 8)
    assert set(report.failed) == {"text", "missing", "cut"} and report.images == 5
    assert "not an image" in report.failed["text"] and "not found" in report.failed["missing"]
    assert "truncated" in report.failed["cut"]
    b = cache.read_region_shard(report.path, producer=CFG.producer(), dataset={"name": "t"})
    assert b.image_ids == ["astronaut", "one", "big", "grey", "cmyk"] and b.failed == report.failed
    assert b.features.shape == (5, 20, 1024) and b.features.dtype == np.float16
    assert b.image_hw.tolist() == [[512, 512], [1, 1], [10_000, 10_000], [512, 512], [427, 640]]
    w = cache.WHOLE_IMAGE_ROW
    for i, (h, wd) in enumerate(b.image_hw):
        assert b.mask[i, w] and b.scores[i, w] == 1 and b.labels[i, w] == -1
        assert b.boxes[i, w].tolist() == [0, 0, wd, h]
        real = b.mask[i]
        assert (b.boxes[i, real, 2] <= wd + 1e-2).all() and (b.boxes[i, real, 3] <= h + 1e-2).all()
        assert not b.features[i, ~real].any() and (b.labels[i, ~real] == -1).all()
        assert np.isfinite(b.features[i]).all()
    assert b.mask[2].sum() == 20 and b.boxes[2, 1:].max() > 1000  # the large image's boxes are in its pixels
    with h5py.File(report.path) as f:
        producer = cache.shard_info(f).producer
    assert producer["k"] == 20 and producer["feature_dim"] == 1024 and producer["weights"] == "random"
    assert producer["backend"] == "torchvision" and producer["feature_dtype"] == "float16"


def test_shard_float32_and_fail_fast(det, mixed_images, tmp_path):
    out = tmp_path / "shard-00000.h5"
    with pytest.raises(RegionExtractionError, match="text"):
        _write(det, mixed_images, out, on_error="fail")
    assert not out.exists() and not list(tmp_path.iterdir())
    _write(det, mixed_images[:2], out, feature_dtype="float32")
    assert cache.read_region_shard(out).features.dtype == np.float32


def test_cache_folder_changes_with_content_only(tmp_path):
    from data.records import Dataset, ImageRecord

    ds = Dataset("t", "t.jsonl", tmp_path, [ImageRecord("a", "a.jpg", "train")], [])
    base = region_cache_folder(tmp_path, ds, CFG, 10)
    assert region_cache_folder(tmp_path, ds, CFG, 10) == base
    changed = [RegionConfig(**{**CFG.__dict__, k: v}) for k, v in [
        ("detector", "torchvision-r50-fpn-v2"), ("seed", 1), ("feature_dtype", "float32"),
        ("max_image_side", 512), ("min_size", 160), ("max_size", 320)]]
    folders = {region_cache_folder(tmp_path, ds, c, 10) for c in changed} | {region_cache_folder(tmp_path, ds, CFG, 5)}
    assert base not in folders and len(folders) == len(changed) + 1


def test_cache_folder_changes_with_the_detector_weights(tmp_path):
    from data.records import Dataset, ImageRecord

    ds = Dataset("t", "t.jsonl", tmp_path, [ImageRecord("a", "a.jpg", "train")], [])
    files = []
    for name, value in (("a/w.pt", 1.0), ("b/w.pt", 2.0)):  # two weight files under one file name
        (tmp_path / name).parent.mkdir()
        torch.save({"w": torch.full((3,), value)}, tmp_path / name)
        files.append(str(tmp_path / name))
    files.append(str(tmp_path / "copy-of-a.pt"))
    shutil.copyfile(files[0], files[2])
    folder = {w: region_cache_folder(tmp_path, ds, RegionConfig(**{**CFG.__dict__, "detector_weights": w}), 10)
              for w in ["pretrained", "random"] + files}
    assert len({folder[w] for w in ["pretrained", "random", files[0], files[1]]}) == 4
    assert folder[files[2]] == folder[files[0]]  # the same weights under another path: the same cache
