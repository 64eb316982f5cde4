"""Strings HDF5 cannot store as text (NUL, lone surrogates) and empty captions: ids and paths are refused when
the dataset is read (file and line named); caption text, triples and failure reasons are stored exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data import load_dataset
from data.records import DatasetError
from pipeline import cache
from pipeline.parse import ParseSettings, parse_shard
from pipeline.vocab import save_vocab, vocab_from_cache

MODELS = Path("tests/stanza_models")
BAD = ["x\u0000y", "bad\udce9.jpg", "\ud800"]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # JSON escapes carry NUL and surrogates
    return path


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("field", ["image", "id"])
def test_jsonl_refuses_unstorable_ids_and_paths_naming_the_line(tmp_path, bad, field):
    good = {"image": "1.jpg", "caption": "a dog", "split": "train"}
    rec = {**good, field: bad}
    with pytest.raises(DatasetError, match=r"caps.jsonl:2: .*(NUL|lone surrogate)"):
        load_dataset(str(_jsonl(tmp_path / "caps.jsonl", [good, rec])))


@pytest.mark.parametrize("bad", BAD)
def test_karpathy_refuses_unstorable_paths(tmp_path, bad):
    doc = {"images": [{"filename": "ok.jpg", "split": "train", "sentences": [{"raw": "a"}]},
                      {"filename": bad, "split": "train", "sentences": [{"raw": "a"}]}]}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"d.json: images\[1\].*(NUL|lone surrogate)"):
        load_dataset(str(tmp_path / "d.json"))


def test_flickr8k_refuses_a_nul_in_an_image_name(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tx\na\x00.jpg#1\ty\n")
    for split in ("train", "dev", "test"):
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("a.jpg\n" if split == "train" else "")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:2: .*NUL"):
        load_dataset(str(tmp_path))


def test_empty_and_whitespace_captions_are_kept_by_every_reader(tmp_path):
    ds = load_dataset(str(_jsonl(tmp_path / "caps.jsonl", [
        {"image": "1.jpg", "caption": "", "split": "train"}, {"image": "1.jpg", "caption": " \t ", "split": "train"},
        {"image": "1.jpg", "caption": "a dog", "split": "train"}])))
    assert [c.text for c in ds.captions] == ["", "", "a dog"]
    doc = {"images": [{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "  "}, {"raw": "a"}]}]}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    assert [c.text for c in load_dataset(str(tmp_path / "d.json")).captions] == ["", "a"]
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\t   \na.jpg#1\ta dog\n")
    for split in ("train", "dev", "test"):
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("a.jpg\n" if split == "train" else "")
    assert [c.text for c in load_dataset(str(tmp_path)).captions] == ["", "a dog"]


TEXTS = ["\u0000", "a dog \u0000 runs on the grass", "\ud800", "a d\ud800g runs on the grass", "", "   ",
         "a brown dog runs"]


def test_parse_shard_stores_every_caption_text_exactly(tmp_path):
    ds = load_dataset(str(_jsonl(tmp_path / "caps.jsonl", [
        {"image": f"{i}.jpg", "caption": t, "split": "train"} for i, t in enumerate(TEXTS)])))
    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"))
    out = parse_shard(ds, 0, len(ds.captions), tmp_path / "t" / "shard-00000.h5", s, 0, 1)
    b = cache.read_triple_shard(out)
    assert b.texts == [t.strip() for t in TEXTS]
    n = np.diff(b.offsets)
    assert n[[0, 2, 4, 5]].tolist() == [0, 0, 0, 0] and n[6] > 0  # no words: stored with no triples
    assert any("\ud800" in w for w in b.head + b.dep)  # the odd word is kept as written
    vocab = vocab_from_cache(tmp_path / "t", {c.caption_id for c in ds.captions}, 1)
    path = save_vocab(vocab, tmp_path / "vocab.json")
    assert "\ud800" in json.loads(path.read_text())["words"]  # the tokenizer split it off; kept exactly


def test_failure_reasons_and_ids_of_any_text_round_trip(tmp_path):
    reasons = ["bad\udce9.jpg: file not found", "nul \u0000 inside", "é ok", ""]
    path = cache.write_region_shard(
        tmp_path / "shard-00000.h5", image_ids=[], image_hw=[], boxes=[], scores=[], labels=[], mask=[],
        features=np.zeros((0, cache.K_FRAGMENTS, 4), np.float16), failed_ids=["a\u0000", "b\ud800", "c", "d"],
        failed_reasons=reasons, producer={}, dataset={}, shard_index=0, num_shards=1)
    assert cache.read_region_shard(path).failed == dict(zip(["a\u0000", "b\ud800", "c", "d"], reasons))
