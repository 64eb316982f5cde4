"""Region sources that read instead of detect: bottom-up-attention TSV (both field layouts, split files, bad rows)
and precomp folders, written by the tests in exactly those formats, through the same shards as a detector."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data import load_dataset
from feature_files import b64, image_regions, tsv_line, write_precomp, write_tsv
from pipeline.cache import WHOLE_IMAGE_ROW, read_region_shard
from pipeline.regions import RegionConfig, RegionExtractionError, region_cache_folder, run_shard
from pipeline.sources import SourceError, describe_source
from pipeline.sources.common import match_images, sampled_sha256
from data.records import ImageRecord

DIM = 64


def jsonl(path: Path, names: list[str], split: str = "test") -> Path:
    path.write_text("".join(json.dumps({"image": n, "caption": f"a photo {k}", "split": split}) + "\n"
                            for k, n in enumerate(names)))
    return path


def shard(tmp: Path, dataset, detector: str, shard_size: int = 100, index: int = 0, **kw):
    cfg = RegionConfig(detector, **kw)
    folder = region_cache_folder(tmp / "cache", dataset, cfg, shard_size)
    report = run_shard(dataset, folder / f"shard-{index:05d}.h5", cfg, shard_size=shard_size, shard_index=index)
    return report, read_region_shard(folder / f"shard-{index:05d}.h5", producer=cfg.producer()), folder


@pytest.fixture()
def tsv_parts(tmp_path):
    """Three split files: 6-field rows, LXMERT's 10-field rows, and 6-field rows with an image of 7 boxes."""
    rng = np.random.default_rng(0)
    truth = {}
    rows: list[list[str]] = [[], [], []]
    for i in range(9):
        n = 7 if i == 8 else 36
        b, f, c = image_regions(rng, n, DIM, h=300 + i, w=400 + i)
        lxmert = 3 <= i < 6
        truth[391895 + i] = (b, f, c if lxmert else None, 300 + i, 400 + i)
        rows[i // 3].append(tsv_line(f"{391895 + i}", b, f, c if lxmert else None, h=300 + i, w=400 + i))
    for k, r in enumerate(rows):
        write_tsv(tmp_path / f"feats.tsv.{k}", r)
    return tmp_path, truth


def test_tsv_rows_fill_the_twenty_row_layout(tsv_parts):
    tmp, truth = tsv_parts
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in truth]
    ds = load_dataset(str(jsonl(tmp / "c.jsonl", names)))
    report, block, _ = shard(tmp, ds, f"butd-tsv:{tmp}/feats.tsv.*", feature_dtype="float32")
    assert report.failed == {} and block.image_ids == names
    for k, (b, f, conf, h, w) in enumerate(truth.values()):
        n = min(len(b), 19)
        order = np.argsort(-conf, kind="stable")[:19] if conf is not None else np.arange(n)  # conf, else file order
        np.testing.assert_allclose(block.features[k, WHOLE_IMAGE_ROW], f.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(block.features[k, 1:1 + n], f[order])
        np.testing.assert_array_equal(block.boxes[k, 1:1 + n], b[order])
        np.testing.assert_array_equal(block.boxes[k, 0], [0, 0, w, h])
        assert tuple(block.image_hw[k]) == (h, w)
        assert block.mask[k].sum() == 1 + n and not block.features[k, 1 + n:].any()
        if conf is not None:
            np.testing.assert_array_equal(block.scores[k, 1:1 + n], conf[order])
            np.testing.assert_array_equal(block.labels[k, 1:1 + n], order)  # objects_id written as 0..n-1
        else:
            assert (block.labels[k, 1:] == -1).all()


def test_tsv_rows_match_by_id_file_name_or_trailing_number():
    rows = {"391895": "coco", "1000092795": "flickr", "1000268201_693b08cb0e": "f8k", "7": "seven"}
    ims = [ImageRecord("a", "val2014/COCO_val2014_000000391895.jpg", "test"),
           ImageRecord("b", "1000092795.jpg", "test"), ImageRecord("c", "1000268201_693b08cb0e.jpg", "test"),
           ImageRecord("d", "x/img_7.jpg", "test"), ImageRecord("e", "y/img_7.jpg", "test")]
    # two images ending in 7 are ambiguous: neither gets row 7
    assert match_images(ims, rows) == {"a": "coco", "b": "flickr", "c": "f8k"}


def test_a_shared_name_form_matches_no_image_even_across_shards(tmp_path):
    rng = np.random.default_rng(2)
    write_tsv(tmp_path / "f.tsv", [tsv_line(7, *image_regions(rng, 5, DIM)[:2])])
    ds = load_dataset(str(jsonl(tmp_path / "c.jsonl", ["x/img_7.jpg", "y/img_7.jpg"])))
    for index in (0, 1):  # one image per shard: each shard alone would see no ambiguity
        report, block, _ = shard(tmp_path, ds, f"butd-tsv:{tmp_path}/f.tsv", shard_size=1, index=index)
        assert block.image_ids == [] and len(report.failed) == 1


def test_bad_rows_are_recorded_and_the_rest_is_written(tmp_path):
    rng = np.random.default_rng(1)
    good = [tsv_line(i, *image_regions(rng, 10, DIM)[:2]) for i in (1, 2)]
    b, f, _ = image_regions(rng, 10, DIM)
    bad_b64 = tsv_line(3, b, f).rsplit("\t", 1)[0] + "\t@@@not base64@@@\r\n"  # features field
    short = tsv_line(4, b, f[:, :DIM - 1])  # wrong size: 63 values per region
    truncated = tsv_line(5, b, f)[:-100]  # the file was cut inside its last line
    write_tsv(tmp_path / "a.tsv", good + [bad_b64, short])
    write_tsv(tmp_path / "b.tsv", [tsv_line(6, b, f), truncated])
    names = [f"{i}.jpg" for i in range(1, 8)]  # 7.jpg has no row at all
    ds = load_dataset(str(jsonl(tmp_path / "c.jsonl", names)))
    report, block, folder = shard(tmp_path, ds, f"butd-tsv:{tmp_path}/*.tsv")
    assert block.image_ids == ["1.jpg", "2.jpg", "6.jpg"]
    assert set(report.failed) == {"3.jpg", "4.jpg", "5.jpg", "7.jpg"} == set(block.failed)
    assert "a.tsv:3" in block.failed["3.jpg"] and "base64" in block.failed["3.jpg"]
    assert "a.tsv:4" in block.failed["4.jpg"] and "bytes" in block.failed["4.jpg"]
    assert "b.tsv:2" in block.failed["5.jpg"] and "cut short" in block.failed["5.jpg"]
    assert "no row for image '7.jpg'" in block.failed["7.jpg"]
    assert (folder / "source-index.json").exists()
    with pytest.raises(RegionExtractionError, match="3.jpg"):
        run_shard(ds, folder / "x.h5", RegionConfig(f"butd-tsv:{tmp_path}/*.tsv"), shard_size=100, shard_index=0,
                  on_error="fail")
    assert not (folder / "x.h5").exists()


def test_cache_key_follows_file_content_and_rule_not_location(tsv_parts, tmp_path_factory):
    tmp, _ = tsv_parts
    p = describe_source(f"butd-tsv:{tmp}/feats.tsv.*")
    assert [f["name"] for f in p["files"]] == ["feats.tsv.0", "feats.tsv.1", "feats.tsv.2"]
    assert p["feature_dim"] == DIM and "objects_conf" in p["selection"] and "mean" in p["whole_image"]
    other = tmp_path_factory.mktemp("moved")
    for f in tmp.glob("feats.tsv.*"):
        (other / f.name).write_bytes(f.read_bytes())
    assert describe_source(f"butd-tsv:{other}/feats.tsv.*") == p  # same content elsewhere: same key
    data = bytearray((other / "feats.tsv.1").read_bytes())
    data[len(data) // 2] ^= 1  # one flipped byte in the middle of a part (inside a sampled block when small)
    (other / "feats.tsv.1").write_bytes(bytes(data))
    assert describe_source(f"butd-tsv:{other}/feats.tsv.*") != p


def test_sampled_identity_sees_the_end_of_a_large_file(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(8 * 2**20))
    before = sampled_sha256(big)
    with open(big, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    assert sampled_sha256(big) != before


def test_unknown_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        describe_source(f"butd-tsv:{tmp_path}/nothing.tsv.*")
    (tmp_path / "x.tsv").write_text("not\ta\ttsv\n")
    with pytest.raises(SourceError, match="bottom-up-attention TSV"):
        describe_source(f"butd-tsv:{tmp_path}/x.tsv")
    with pytest.raises(SourceError, match="_ims.npy"):
        describe_source(f"precomp:{tmp_path}")


def _captions(n: int) -> list[list[str]]:
    return [[f"a dog number {i} runs {k}" for k in range(5)] for i in range(n)]


@pytest.mark.parametrize("with_ids", [False, True])
def test_precomp_features_by_row_with_and_without_ids(tmp_path, with_ids):
    ids = {"train": [str(100 + i) for i in range(4)], "dev": ["200", "201"], "test": ["300", "301", "302"]}
    feats = write_precomp(tmp_path / "f30k_precomp", {"train": _captions(4), "dev": _captions(2),
                                                      "test": _captions(3)}, DIM, ids=ids if with_ids else None,
                          per_caption_rows=("dev",))
    ds = load_dataset(str(tmp_path / "f30k_precomp"))
    report, block, _ = shard(tmp_path, ds, f"precomp:{tmp_path / 'f30k_precomp'}", feature_dtype="float32")
    assert report.failed == {}
    want = [f for s in ("train", "dev", "test") for f in feats[s]]
    expect_ids = [i for s in ("train", "dev", "test") for i in ids[s]] if with_ids else \
        [f"{p}-{i}" for p, n in (("train", 4), ("dev", 2), ("test", 3)) for i in range(n)]
    assert block.image_ids == expect_ids
    for k, f in enumerate(want):
        np.testing.assert_allclose(block.features[k, 0], f.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(block.features[k, 1:], f[:19])  # the file's order
    assert block.mask.all()


def test_precomp_source_for_a_karpathy_dataset_by_ids(tmp_path):
    write_precomp(tmp_path / "pc", {"test": _captions(2)}, DIM, ids={"test": ["391895", "42"]})
    names = ["val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000000042.jpg", "other.jpg"]
    ds = load_dataset(str(jsonl(tmp_path / "c.jsonl", names)))
    report, block, _ = shard(tmp_path, ds, f"precomp:{tmp_path / 'pc'}")
    assert block.image_ids == names[:2] and list(report.failed) == ["other.jpg"]


def test_one_index_pass_serves_every_shard(tsv_parts):
    tmp, truth = tsv_parts
    names = [f"{i}.jpg" for i in truth]
    ds = load_dataset(str(jsonl(tmp / "c.jsonl", names)))
    _, first, folder = shard(tmp, ds, f"butd-tsv:{tmp}/feats.tsv.*", shard_size=4, index=0)
    index = folder / "source-index.json"
    stamp = index.stat().st_mtime_ns
    _, last, _ = shard(tmp, ds, f"butd-tsv:{tmp}/feats.tsv.*", shard_size=4, index=2)
    assert index.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert first.image_ids == names[:4] and last.image_ids == names[8:]
    assert json.loads(index.read_text())["rows"]["391903"][3] == 3  # line 3 of the third part


def test_a_row_feeds_one_image_only():
    # row 5 matches a/5.jpg by its file name; img_5.jpg's trailing number must not take the same row
    rows = {"5": "five", "1": "one"}
    ims = [ImageRecord("a/5.jpg", "a/5.jpg", "test"), ImageRecord("img_5.jpg", "img_5.jpg", "test"),
           ImageRecord("1.jpg", "1.jpg", "test")]
    assert match_images(ims, rows) == {"a/5.jpg": "five", "1.jpg": "one"}


def _row_with(rng, **change) -> str:
    """A 10-field (LXMERT) row of image 1 with one field replaced by a hostile value."""
    b, f, c = image_regions(rng, 10, DIM)
    b, f, c = change.get("boxes", b), change.get("feats", f), change.get("conf", c)
    line = tsv_line(change.get("id", 1), b, f, c, h=change.get("h", 375), w=change.get("w", 500))
    if "ids" in change:
        fields = line.split("\t")
        fields[3] = b64(np.asarray(change["ids"], np.int64))
        line = "\t".join(fields)
    return line


@pytest.mark.parametrize("change, reason", [
    (dict(h=10 ** 12, w=10 ** 12), "image size 1000000000000 x 1000000000000 is out of range"),
    (dict(feats="nan"), "features hold NaN or infinity (region 3)"),
    (dict(boxes="nan"), "box 2 holds NaN or infinity"),
    (dict(boxes="inverted"), "box 0 [90.0, 40.0, 10.0, 5.0]"),
    (dict(boxes="far"), "not a box inside the row's 500 x 375 image"),
    (dict(h=500, w=375, boxes="wide"), "width and height swapped"),
    (dict(conf="nan"), "confidences hold NaN"),
    (dict(ids=[2 ** 40 + 7] * 10), "class ids outside"),
])
def test_hostile_numbers_in_a_row_cost_only_that_image(tmp_path, change, reason):
    rng = np.random.default_rng(4)
    b, f, c = image_regions(rng, 10, DIM)
    if change.get("feats") == "nan":
        f = f.copy(); f[3, 5] = np.nan; change["feats"] = f  # noqa: E702
    if isinstance(change.get("boxes"), str):
        kind, b = change["boxes"], b.copy()
        if kind == "nan":
            b[2, 1] = np.nan
        elif kind == "inverted":
            b[0] = (90, 40, 10, 5)
        elif kind == "far":
            b[4] = (-1e9, 0, 1e9, 10)
        else:  # a box 480 wide: fits 500 x 375, not the 375 x 500 the row claims
            b[1] = (10, 10, 490, 300)
        change["boxes"] = b
    if change.get("conf") == "nan":
        c = c.copy(); c[0] = np.nan; change["conf"] = c  # noqa: E702
    write_tsv(tmp_path / "f.tsv", [_row_with(rng, **change), tsv_line(2, *image_regions(rng, 10, DIM)[:2])])
    ds = load_dataset(str(jsonl(tmp_path / "c.jsonl", ["1.jpg", "2.jpg"])))
    report, block, _ = shard(tmp_path, ds, f"butd-tsv:{tmp_path}/f.tsv", feature_dtype="float32")
    assert block.image_ids == ["2.jpg"] and list(report.failed) == ["1.jpg"]
    assert "f.tsv:1" in report.failed["1.jpg"] and reason in report.failed["1.jpg"], report.failed


def test_one_odd_row_first_does_not_set_the_feature_size(tmp_path):
    rng = np.random.default_rng(5)
    odd = tsv_line(1, *image_regions(rng, 6, 2 * DIM)[:2])  # consistent in itself, but 128-d
    write_tsv(tmp_path / "f.tsv", [odd] + [tsv_line(i, *image_regions(rng, 6, DIM)[:2]) for i in range(2, 7)])
    assert describe_source(f"butd-tsv:{tmp_path}/f.tsv")["feature_dim"] == DIM
    ds = load_dataset(str(jsonl(tmp_path / "c.jsonl", [f"{i}.jpg" for i in range(1, 7)])))
    report, block, _ = shard(tmp_path, ds, f"butd-tsv:{tmp_path}/f.tsv")
    assert list(report.failed) == ["1.jpg"] and "f.tsv:1" in report.failed["1.jpg"]
    assert len(block.image_ids) == 5 and block.features.shape[-1] == DIM


def test_a_damaged_row_index_is_rebuilt(tsv_parts):
    tmp, truth = tsv_parts
    ds = load_dataset(str(jsonl(tmp / "c.jsonl", [f"{i}.jpg" for i in truth])))
    _, first, folder = shard(tmp, ds, f"butd-tsv:{tmp}/feats.tsv.*", shard_size=4, index=0)
    index = folder / "source-index.json"
    whole = index.read_text()
    for damage in (whole[:40], whole.replace("[0, 0,", "[7, 0,", 1), whole.replace('"391903": [2,', '"391903": [',
                                                                                      1)):
        index.write_text(damage)  # cut short (a full disk, a kill), or an entry out of the files
        assert damage != whole
        report, again, _ = shard(tmp, ds, f"butd-tsv:{tmp}/feats.tsv.*", shard_size=4, index=0)
        assert report.failed == {} and again.image_ids == first.image_ids
        assert json.loads(index.read_text())["rows"]["391903"][3] == 3
