"""Dataset readers: the real Flickr8k text files, small Karpathy/JSONL files written here, the demo set, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data import DEMO_DIR, SPLITS, DatasetError, load_dataset
from data.checks import image_path
from data.flickr8k import read_token_file

FLICKR8K = Path(__file__).resolve().parent / "data" / "flickr8k"  # the real Flickr8k text files (see its NOTICE)
ODD = "2258277193_586949ec62.jpg"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def jsonl(path: Path, *records) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


# ------------------------------------------------------------------------------------------- Flickr8k (real)

@pytest.fixture(scope="module")
def flickr8k():
    return load_dataset(str(FLICKR8K))


def test_flickr8k_token_file_counts_and_the_odd_key():
    caps = read_token_file(FLICKR8K / "Flickr8k.token.txt")
    assert sum(len(c) for c in caps.values()) == 40_460
    assert len(caps) == 8_092  # the odd key is not a 8,093rd image
    assert {len(c) for c in caps.values()} == {5}
    assert not any(i.endswith(".1") for i in caps)
    # The odd key `<ODD>.1#0` is that image's missing #0: it keeps its own (unique) caption id.
    assert [c.caption_id for c in caps[ODD]] == [f"{ODD}.1#0"] + [f"{ODD}#{n}" for n in range(1, 5)]
    assert caps[ODD][0].text == "people waiting for the subway"
    assert all(c.image_id == ODD and c.tokens is None for c in caps[ODD])


def test_flickr8k_official_splits(flickr8k):
    assert flickr8k.name == "flickr8k"
    assert [len(flickr8k.split_images(s)) for s in SPLITS] == [6_000, 1_000, 1_000]
    assert len(flickr8k.images) == 8_000  # the 92 images of no split list are left out, with their captions
    assert len(flickr8k.captions) == 40_000
    assert [len(flickr8k.split_captions(s)) for s in SPLITS] == [30_000, 5_000, 5_000]
    assert len({c.caption_id for c in flickr8k.captions}) == 40_000
    by_image = flickr8k.captions_by_image()
    assert {len(c) for c in by_image.values()} == {5}
    first = flickr8k.images[0]
    assert first.image_id == first.path == "1000268201_693b08cb0e.jpg" and first.split == "train"
    assert by_image[first.image_id][0].caption_id == "1000268201_693b08cb0e.jpg#0"
    assert by_image[first.image_id][0].text.startswith("A child in a pink dress is climbing up")
    dev = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()
    assert sorted(im.image_id for im in flickr8k.split_images("val")) == sorted(dev)
    assert ODD not in {im.image_id for im in flickr8k.images}  # it is in no split list
    assert flickr8k.image_root == FLICKR8K  # no image folder beside the text files


def test_flickr8k_token_file_path_is_the_same_dataset(flickr8k):
    assert load_dataset(FLICKR8K / "Flickr8k.token.txt").identity == flickr8k.identity


# ------------------------------------------------------------------------------------------- Flickr8k (small)

def flickr8k_files(tmp_path: Path, token: str, train="a.jpg\n", dev="b.jpg\n", test="c.jpg\n") -> Path:
    for name, text in (("trainImages", train), ("devImages", dev), ("testImages", test)):
        write(tmp_path / f"Flickr_8k.{name}.txt", text)
    return write(tmp_path / "Flickr8k.token.txt", token)


def test_flickr8k_odd_key_inside_a_split(tmp_path):
    token = "".join(f"a.jpg#{n}\tcap {n}\n" for n in (1, 2)) + "a.jpg.1#0\tcap 0\nb.jpg#0\tb\nc.jpg#0\tc\n" \
        "d.jpg#0\tin no split list\n"
    ds = load_dataset(flickr8k_files(tmp_path, token))
    by_image = ds.captions_by_image()
    assert sorted(by_image) == ["a.jpg", "b.jpg", "c.jpg"]
    assert [c.caption_id for c in by_image["a.jpg"]] == ["a.jpg#1", "a.jpg#2", "a.jpg.1#0"]
    assert ds.image_path("a.jpg") == tmp_path / "a.jpg"


def test_flickr8k_suffix_without_a_known_image_is_left_alone(tmp_path):
    caps = read_token_file(write(tmp_path / "Flickr8k.token.txt", "x.jpg.1#0\tone\ny.jpg#0\ttwo\n"))
    assert sorted(caps) == ["x.jpg.1", "y.jpg"]


def test_flickr8k_default_image_root_beside_the_text_folder(tmp_path):
    token = flickr8k_files(tmp_path / "Flickr8k_text", "a.jpg#0\ta\nb.jpg#0\tb\nc.jpg#0\tc\n")
    (tmp_path / "Flicker8k_Dataset").mkdir()
    assert load_dataset(token).image_root == tmp_path / "Flicker8k_Dataset"
    assert load_dataset(token, tmp_path / "elsewhere").image_root == tmp_path / "elsewhere"


@pytest.mark.parametrize("token, lists, match", [
    ("a.jpg#0\tx\nb.jpg#0\ty\na.jpg#0\tz\n", {}, r"Flickr8k.token.txt:3: caption id 'a.jpg#0' .* line 1"),
    ("a.jpg#0\tx\na.jpg 1 no tab\n", {}, r"Flickr8k.token.txt:2: expected '<image>#<n><TAB><caption>'"),
    ("a.jpg#zero\tx\n", {}, r"Flickr8k.token.txt:1: expected"),
    ("a\x00.jpg#0\tx\n", {}, r"Flickr8k.token.txt:1: image path 'a\\x00.jpg' contains a NUL character"),
    ("../a.jpg#0\tx\n", {}, r"Flickr8k.token.txt:1: image path '../a.jpg' leaves the image root"),
    ("a.jpg#0\tx\n", {"dev": "a.jpg\n"}, r"devImages.txt:1: image 'a.jpg' is already in split 'train'"),
    ("a.jpg#0\tx\n", {"train": "b.jpg\n", "dev": "", "test": ""}, r"Flickr8k.token.txt: the dataset is empty"),
    ("a.jpg#0\tx\n", {"test": "/etc/passwd\n"}, r"testImages.txt:1: image path '/etc/passwd' is absolute"),
])
def test_flickr8k_bad_input(tmp_path, token, lists, match):
    token_path = flickr8k_files(tmp_path, token, **lists)
    with pytest.raises(DatasetError, match=match):
        load_dataset(token_path)


def test_flickr8k_missing_split_list(tmp_path):
    flickr8k_files(tmp_path, "a.jpg#0\tx\n")
    (tmp_path / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(DatasetError, match=r"Flickr_8k.testImages.txt: split list not found"):
        load_dataset(tmp_path)  # the folder means its token file


# ------------------------------------------------------------------------------------------- Karpathy JSON

def karpathy(tmp_path: Path, images, name="dataset_flickr8k.json") -> Path:
    return write(tmp_path / name, json.dumps({"images": images, "dataset": "test"}, indent=1))


def k_image(filename, split, *raws, filepath=None):
    rec = {"filename": filename, "split": split, "imgid": 0,
           "sentences": [{"raw": r, "tokens": r.lower().rstrip(" .").split(), "sentid": 7} for r in raws]}
    if filepath is not None:
        rec["filepath"] = filepath
    return rec


def test_karpathy_json(tmp_path):
    path = karpathy(tmp_path, [
        k_image("1.jpg", "train", "A dog runs .", "A brown dog runs on grass ."),
        k_image("2.jpg", "restval", "Two cats sleep ."),
        k_image("3.jpg", "val", "A man rides a bike .", filepath="val2014"),
        k_image("4.jpg", "test", "A red car .", filepath=""),
    ])
    (tmp_path / "images").mkdir()
    ds = load_dataset(str(path))
    assert ds.name == "flickr8k" and ds.source == str(path) and ds.image_root == tmp_path / "images"
    assert [(im.image_id, im.path, im.split) for im in ds.images] == [
        ("1.jpg", "1.jpg", "train"), ("2.jpg", "2.jpg", "train"), ("val2014/3.jpg", "val2014/3.jpg", "val"),
        ("4.jpg", "4.jpg", "test")]
    assert [c.caption_id for c in ds.captions] == ["1.jpg#0", "1.jpg#1", "2.jpg#0", "val2014/3.jpg#0", "4.jpg#0"]
    assert ds.captions[1].text == "A brown dog runs on grass ."
    assert ds.captions[1].tokens == ("a", "brown", "dog", "runs", "on", "grass")
    assert ds.image_path("val2014/3.jpg") == tmp_path / "images" / "val2014" / "3.jpg"
    assert load_dataset(path, tmp_path).image_root == tmp_path


def test_karpathy_without_tokens(tmp_path):
    ds = load_dataset(karpathy(tmp_path, [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a b"}]}]))
    assert ds.captions[0].tokens is None and ds.image_root == tmp_path


@pytest.mark.parametrize("images, match", [
    ([{"filename": "1.jpg", "split": "train"}], r"images\[0\]: missing field 'sentences'"),
    ([k_image("1.jpg", "train", "a"), k_image("2.jpg", "holdout", "b")],
     r"images\[1\] \('2.jpg'\): unknown split 'holdout' — use one of dev, restval, test, train, val"),
    ([k_image("1.jpg", "train", "a"), k_image("1.jpg", "test", "b")],
     r"images\[1\] \('1.jpg'\): image '1.jpg' is listed twice \(first at .*images\[0\]"),
    ([k_image("passwd", "train", "a", filepath="/etc")], r"images\[0\] \('passwd'\): image path '/etc/passwd' is abs"),
    ([k_image("x.jpg", "train", "a", filepath="../other")], r"image path '../other/x.jpg' leaves the image root"),
    ([{"filename": "1.jpg", "split": "train", "sentences": [{"tokens": ["a"]}]}],
     r"images\[0\] \('1.jpg'\) sentences\[0\]: missing field 'raw'"),
    ([{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a", "tokens": "a"}]}],
     r"sentences\[0\]: 'tokens' must be a list of strings"),
    ([{"filename": "1.jpg", "split": "train", "sentences": [{"raw": 3}]}], r"sentences\[0\]: caption text 3"),
    ([{"filename": "1.jpg", "split": "train", "sentences": "a dog"}], r"'sentences' must be a list"),
    (["1.jpg"], r"images\[0\]: expected an object, got str"),
    ([k_image(7, "train", "a", filepath="val2014")], r"images\[0\] \(7\): 'filename' and 'filepath' must be str"),
    ([], r"the dataset is empty \(0 images"),
    ([k_image("1.jpg", "train")], r"the dataset is empty \(1 images with a split, 0 captions\)"),
])
def test_karpathy_bad_records(tmp_path, images, match):
    path = karpathy(tmp_path, images)
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset(path)
    assert str(e.value).startswith(str(path))


def test_karpathy_malformed_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "d.json", '{"images": [\n  {"filename": "1.jpg",\n   "split": "train" "x"}\n]}\n')
    with pytest.raises(DatasetError, match=r"d.json:3:21: malformed JSON"):
        load_dataset(path)
    with pytest.raises(DatasetError, match=r"d.json: no top-level 'images' list"):
        load_dataset(write(path, "[1, 2]"))
    with pytest.raises(DatasetError, match=r"d.json: JSON nested too deeply"):
        load_dataset(write(path, '{"images": ' + "[" * 100000 + "]" * 100000 + "}"))


# ------------------------------------------------------------------------------------------- JSONL

def test_jsonl(tmp_path):
    path = jsonl(tmp_path / "caps.jsonl",
                 {"image": "dogs/1.jpg", "caption": "a dog runs", "split": "train"},
                 {"image": "./dogs/1.jpg", "caption": " a dog on grass ", "split": "train", "license": "CC0"},
                 "",
                 {"image": "2.jpg", "caption": "a cat", "split": "dev", "id": 17, "tokens": ["a", "cat"]},
                 {"image": "3.jpg", "caption": "a car", "split": "test", "id": "car-1"})
    ds = load_dataset(path)
    assert ds.name == "caps" and ds.image_root == tmp_path
    assert [(im.image_id, im.split) for im in ds.images] == [("dogs/1.jpg", "train"), ("2.jpg", "val"),
                                                              ("3.jpg", "test")]
    assert [(c.caption_id, c.image_id, c.text, c.tokens) for c in ds.captions] == [
        ("dogs/1.jpg#0", "dogs/1.jpg", "a dog runs", None), ("dogs/1.jpg#1", "dogs/1.jpg", "a dog on grass", None),
        ("17", "2.jpg", "a cat", ("a", "cat")), ("car-1", "3.jpg", "a car", None)]
    assert ds.image_path("dogs/1.jpg") == tmp_path / "dogs" / "1.jpg"
    assert load_dataset(path).identity == ds.identity


@pytest.mark.parametrize("lines, match", [
    (['{"image": "1.jpg", "caption": "a", "split": "train"}', '{"image": "2.jpg", "caption": "b" "split": 1}'],
     r"caps.jsonl:2: malformed JSON at column 35"),
    (['{"image": "1.jpg", "split": "train"}'], r"caps.jsonl:1: missing field 'caption'"),
    (['{"image": "1.jpg", "caption": "a"}'], r"caps.jsonl:1: missing field 'split'"),
    (['{"image": "1.jpg", "caption": "a", "split": "training"}'], r"caps.jsonl:1: unknown split 'training'"),
    (['{"image": "1.jpg", "caption": "a", "split": "train"}', '{"image": "1.jpg", "caption": "b", "split": "test"}'],
     r"caps.jsonl:2: image '1.jpg' is given split 'test' .* but .*caps.jsonl:1 gave split 'train'"),
    (['{"image": "1.jpg", "caption": "a", "split": "train", "id": "x"}',
      '{"image": "2.jpg", "caption": "b", "split": "train", "id": "x"}'],
     r"caps.jsonl:2: caption id 'x' was already used at .*caps.jsonl:1"),
    (['{"image": "1.jpg", "caption": "a", "split": "train", "id": "1.jpg#1"}',
      '{"image": "1.jpg", "caption": "b", "split": "train"}'],
     r"caps.jsonl:2: caption id '1.jpg#1' was already used at .*caps.jsonl:1"),
    (['{"image": "/data/1.jpg", "caption": "a", "split": "train"}'], r"caps.jsonl:1: image path '/data/1.jpg' is abs"),
    (['{"image": "a/../../1.jpg", "caption": "a", "split": "train"}'], r"caps.jsonl:1: .* leaves the image root"),
    (['{"image": 5, "caption": "a", "split": "train"}'], r"caps.jsonl:1: image path 5 is not a non-empty string"),
    (['{"image": "1.jpg", "caption": null, "split": "train"}'], r"caps.jsonl:1: caption text None is not a string"),
    (['{"image": "1.jpg", "caption": "a", "split": "train", "id": null}'], r"caps.jsonl:1: 'id' must be"),
    (['["1.jpg", "a", "train"]'], r"caps.jsonl:1: expected a JSON object, got list"),
    (["", "  "], r"caps.jsonl: the dataset is empty"),
    (['{"image": "1.jpg", "caption": "a", "split": "train"}', "[" * 100000 + "]" * 100000],
     r"caps.jsonl:2: JSON nested too deeply"),
])
def test_jsonl_bad_input(tmp_path, lines, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(jsonl(tmp_path / "caps.jsonl", *lines))


def test_non_utf8_file_names_the_line(tmp_path):
    good = json.dumps({"image": "1.jpg", "caption": "a cafe", "split": "train"}).encode() + b"\n"
    bad = '{"image": "2.jpg", "caption": "a caf\u00e9", "split": "train"}\n'.encode("latin-1")
    with pytest.raises(DatasetError, match=r"caps.jsonl:3: byte 0xe9 at column 37 is not UTF-8"):
        load_dataset(write(tmp_path / "caps.jsonl", good + good + bad))
    token = flickr8k_files(tmp_path, b"a.jpg#0\tok\nb.jpg#0\tna\xefve\n")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:2: byte 0xef"):
        load_dataset(token)
    # A UTF-8 byte-order mark is not an error.
    assert len(load_dataset(write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + good)).captions) == 1


# ------------------------------------------------------------------------------------------- paths, dispatch

@pytest.mark.parametrize("raw", ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "..", ".", "", " ", "C:/x.jpg",
                                 "c:x.jpg", "a\\b.jpg", "..\\x.jpg", "a\0b", None, 3])
def test_image_paths_outside_the_root_are_refused(raw):
    with pytest.raises(DatasetError, match=r"^f.jsonl:4: image path"):
        image_path(raw, "f.jsonl:4")


@pytest.mark.parametrize("raw, norm", [("a.jpg", "a.jpg"), ("./a/b.jpg", "a/b.jpg"), ("a//b.jpg", "a/b.jpg"),
                                       ("a/../b.jpg", "b.jpg"), ("..a.jpg", "..a.jpg")])
def test_image_paths_are_normalised(raw, norm):
    assert image_path(raw, "f") == norm


def test_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope': not a registered name \(demo\)"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match=r"holds no Flickr8k.token.txt"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"x.csv: unknown dataset format"):
        load_dataset(write(tmp_path / "x.csv", "a,b\n"))


# ------------------------------------------------------------------------------------------- the demo set

def test_demo_set():
    ds = load_dataset("demo")
    assert ds.name == "demo" and ds.image_root == DEMO_DIR / "images"
    assert [len(ds.split_images(s)) for s in SPLITS] == [10, 2, 2]
    with open(DEMO_DIR / "photos.tsv", newline="") as f:
        licensed = {row["file"]: row["license"] for row in csv.DictReader(f, delimiter="\t")}
    assert sorted(im.image_id for im in ds.images) == sorted(licensed) == sorted(
        p.name for p in (DEMO_DIR / "images").iterdir())
    assert all(("CC0" in lic or "public domain" in lic or "no known copyright" in lic) for lic in licensed.values())
    assert all(ds.image_path(im.image_id).is_file() for im in ds.images)
    assert all(3 <= len(c) <= 5 for c in ds.captions_by_image().values())
    assert len({c.text for c in ds.captions}) == len(ds.captions)
    for name in ("LICENSE-CC0-1.0.txt", "LICENSE-scikit-image.txt", "NOTICE.txt", "README.md"):
        assert (DEMO_DIR / name).stat().st_size > 0
