"""Precomp folders as datasets (captions, ids, splits), the two real Karpathy test caption files through the
reader and the parse stage, the paper's figures beside a result, and the whole task graph through Luigi on
generated features (precomp folder; bottom-up TSV with a Karpathy JSON)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import luigi
import numpy as np
import pytest
from luigi.execution_summary import LuigiStatusCode

import tasks
from data import DatasetError, load_dataset
from feature_files import image_regions, tsv_line, write_precomp, write_tsv
from model.published import published, recognise
from pipeline.cache import list_shards, read_triple_shard

HERE = Path(__file__).resolve().parent
CAPTIONS = HERE / "data" / "karpathy_test_captions"
TAGGER, PARSER = HERE / "stanza_models" / "en_ewt_tagger_small.pt", HERE / "stanza_models" / "en_ewt_parser_small.pt"
DIM = 64
WORDS = "dog cat man woman child runs jumps sits red blue green grass water ball street beach".split()


def captions(n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"a {' '.join(rng.choice(WORDS, 4))} ." for _ in range(5)] for _ in range(n)]


def test_precomp_folder_splits_ids_and_captions(tmp_path):
    folder = tmp_path / "f30k_precomp"
    write_precomp(folder, {"train": captions(3), "dev": captions(2), "test": captions(2), "testall": captions(4)},
                  DIM, ids={"dev": ["d0", "d0", "d0", "d0", "d0", "d1", "d1", "d1", "d1", "d1"]})  # per caption
    ds = load_dataset(str(folder))
    assert ds.name == "f30k_precomp"
    assert [im.image_id for im in ds.split_images("train")] == ["train-0", "train-1", "train-2"]
    assert [im.image_id for im in ds.split_images("val")] == ["d0", "d1"]  # dev is val; ids per caption
    assert [im.image_id for im in ds.split_images("test")] == ["test-0", "test-1"]
    caps = ds.split_captions("val")
    assert [c.caption_id for c in caps[:6]] == ["d0#0", "d0#1", "d0#2", "d0#3", "d0#4", "d1#0"]
    lines = (folder / "dev_caps.txt").read_text().splitlines()
    assert [c.text for c in caps] == lines  # lines 5i..5i+4 belong to image i
    all5k = load_dataset(str(folder / "testall_caps.txt"))  # testall chosen by naming its captions
    assert [im.image_id for im in all5k.split_images("test")] == [f"testall-{i}" for i in range(4)]


def test_an_empty_caption_line_keeps_the_lines_after_it_on_their_images(tmp_path):
    folder = tmp_path / "pc"
    folder.mkdir()
    lines = [f"caption {i}" for i in range(10)]
    lines[2] = ""
    (folder / "test_caps.txt").write_text("\n".join(lines) + "\n")
    caps = load_dataset(str(folder)).captions
    assert len(caps) == 10 and caps[2].text == "" and (caps[5].caption_id, caps[5].text) == ("test-1#0", "caption 5")


def test_precomp_folder_errors_name_the_file(tmp_path):
    folder = tmp_path / "pc"
    write_precomp(folder, {"test": captions(2)}, DIM, ids={"test": ["a", "b", "c"]})
    with pytest.raises(DatasetError, match=r"test_ids.txt: 3 ids for 2 images"):
        load_dataset(str(folder))
    (folder / "test_ids.txt").unlink()
    np.save(folder / "test_ims.npy", np.zeros((3, 36, DIM), np.float32))
    with pytest.raises(DatasetError, match=r"test_ims.npy: 3 feature rows do not fit 10 captions"):
        load_dataset(str(folder))
    (folder / "test_ims.npy").write_bytes(b"")  # an interrupted copy
    with pytest.raises(DatasetError, match=r"test_ims.npy: not a readable .npy array \(EOFError"):
        load_dataset(str(folder))
    np.save(folder / "test_ims.npy", np.float32(0))
    with pytest.raises(DatasetError, match=r"test_ims.npy: a single number, not an array"):
        load_dataset(str(folder))
    (folder / "train_caps.txt").write_text("a dog\n" * 5)
    with pytest.raises(DatasetError, match="test_caps.txt or testall_caps.txt"):
        load_dataset(str(folder / "train_caps.txt"))


@pytest.fixture(scope="module")
def real_captions(tmp_path_factory):
    """The real Flickr30K 1K and COCO 5K test caption files as the test captions of two precomp folders."""
    root = tmp_path_factory.mktemp("real")
    (root / "f30k_precomp").mkdir()
    shutil.copy(CAPTIONS / "f30k_karpathy_test1k_caps.txt", root / "f30k_precomp" / "test_caps.txt")
    (root / "coco_precomp").mkdir()
    shutil.copy(CAPTIONS / "coco_karpathy_test5k_caps.txt", root / "coco_precomp" / "testall_caps.txt")
    return root


def test_real_caption_files_through_the_reader(real_captions):
    f30k = load_dataset(str(real_captions / "f30k_precomp"))
    assert (len(f30k.split_images("test")), len(f30k.captions)) == (1000, 5000)
    first = (CAPTIONS / "f30k_karpathy_test1k_caps.txt").read_text().splitlines()
    assert f30k.captions[5].text == first[5].strip() and f30k.captions[5].image_id == "test-1"
    coco = load_dataset(str(real_captions / "coco_precomp" / "testall_caps.txt"))
    assert (len(coco.split_images("test")), len(coco.captions)) == (5000, 25000)
    assert recognise(f30k.name, {"test": 1000}) == "flickr30k" and recognise(coco.name, {}) == "coco"


@pytest.mark.slow
def test_real_captions_through_the_parse_stage(real_captions, tmp_path):
    """The first 4 images (20 captions) of each real file, parsed by ParseSentences with the small models."""
    done = []
    for name, src, dest in (("f30k_precomp", "f30k_karpathy_test1k_caps.txt", "test_caps.txt"),
                            ("coco_precomp", "coco_karpathy_test5k_caps.txt", "testall_caps.txt")):
        folder = tmp_path / name
        folder.mkdir()
        lines = (CAPTIONS / src).read_text().splitlines()[:20]
        (folder / dest).write_text("\n".join(lines) + "\n")
        dataset = str(folder if dest == "test_caps.txt" else folder / dest)
        task = tasks.ParseSentences(dataset=dataset, cache_dir=str(tmp_path / "cache"), stanza_tagger=str(TAGGER),
                                    stanza_parser=str(PARSER), shard_size=15, device="cpu")
        assert luigi.build([task], local_scheduler=True, log_level="WARNING")
        blocks = [read_triple_shard(p) for p in list_shards(task.triple_folder())]
        texts = [t for b in blocks for t in b.texts]
        assert texts == [line.strip() for line in lines] and len(blocks) == 2
        n_triples = [len(b.triples(m)) for b in blocks for m in range(len(b.caption_ids))]
        assert min(n_triples) > 0  # every real caption gives triples
        done.append(blocks[0].image_ids[5])
    assert done == ["test-1", "testall-1"]


def test_paper_figures_by_name_or_split_sizes():
    assert recognise("flickr8k", {}) == "flickr8k" and recognise("dataset_flickr30k", {}) == "flickr30k"
    assert recognise("mine", {"train": 29000, "val": 1014, "test": 1000}) == "flickr30k"
    assert recognise("mine", {"train": 6000, "val": 1000, "test": 1000}) == "flickr8k"
    assert recognise("demo", {"train": 10, "val": 2, "test": 2}) is None
    f8k = published("flickr8k", {})["rows"]["DeFrag (paper)"]
    assert f8k["annotation"] == {"r1": 0.126, "r5": 0.329, "r10": 0.44, "medr": 14}
    assert f8k["search"] == {"r1": 0.097, "r5": 0.296, "r10": 0.425, "medr": 15}
    f30k = published("f30k_precomp", {})["rows"]
    assert [f30k[r]["annotation"]["r1"] for r in f30k] == [0.142, 0.164]
    assert [f30k[r]["search"]["medr"] for r in f30k] == [14, 13]
    assert published("coco", {})["rows"] == {}


# ------------------------------------------------------------------------------------------ whole graph

def small(tmp: Path, **kw) -> dict:
    return dict(cache_dir=str(tmp / "cache"), run_dir=str(tmp / "runs"), device="cpu", stanza_tagger=str(TAGGER),
                stanza_parser=str(PARSER), min_count=1, epochs=2, batch_size=8, embedding_dim=32, word_dim=16,
                progress=False, **kw)


@pytest.mark.slow
def test_evaluate_on_a_precomp_folder_with_its_features(tmp_path):
    folder = tmp_path / "f30k_precomp"
    write_precomp(folder, {"train": captions(24, 1), "dev": captions(4, 2), "testall": captions(10, 3)}, DIM)
    task = tasks.Evaluate(dataset=str(folder / "testall_caps.txt"), detector=f"precomp:{folder}", fold_size=5,
                          **small(tmp_path))
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status == LuigiStatusCode.SUCCESS, res.summary_text
    result = json.loads(Path(task.output()["json"].path).read_text())
    assert result["all"]["n_images"] == 10 and result["folds"]["n_folds"] == 2  # the 5K and 5 x 1K protocols
    md = Path(task.output()["markdown"].path).read_text()
    run_row, paper = md.index("| DeFrag (defrag-"), md.index("Published figures, not measured here")
    assert run_row < paper and "| DeFrag, fine-tuned CNN (paper) | 16.4 | 40.2 | 54.7 | 8 | 10.3 | 31.4 | 44.5 | 13 |" \
        in md[paper:] and "(paper)" not in md[:paper]
    assert result["published"]["dataset"] == "flickr30k"
    report = tasks.Report(dataset=str(folder / "testall_caps.txt"), detector=f"precomp:{folder}", fold_size=5,
                          report_queries=2, **small(tmp_path))
    assert luigi.build([report], local_scheduler=True, log_level="WARNING")  # no image files: no thumbnails
    page = Path(report.output().path).read_text()
    assert "Published figures (not measured here)" in page and "(no image file)" in page


@pytest.mark.slow
def test_evaluate_on_bottom_up_tsv_with_a_karpathy_json(tmp_path):
    rng = np.random.default_rng(5)
    images, rows = [], []
    for i in range(30):
        split = "train" if i < 22 else ("val" if i < 26 else "test")
        images.append({"filename": f"{1000092795 + i}.jpg", "split": split,
                       "sentences": [{"raw": c} for c in captions(1, i)[0]]})
        b, f, c = image_regions(rng, 36, DIM)
        rows.append(tsv_line(1000092795 + i, b, f, c if i % 2 else None))
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    write_tsv(tmp_path / "f.tsv.0", rows[:15])
    write_tsv(tmp_path / "f.tsv.1", rows[15:])
    task = tasks.Evaluate(dataset=str(tmp_path / "dataset_flickr30k.json"), detector=f"butd-tsv:{tmp_path}/f.tsv.*",
                          **small(tmp_path))
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status == LuigiStatusCode.SUCCESS, res.summary_text
    md = Path(task.output()["markdown"].path).read_text()
    assert "| DeFrag (paper) | 14.2 | 37.7 | 51.3 | 10 | 10.2 | 30.8 | 44.2 | 14 |" in md
    summary = json.loads(Path(task.requires().requires()["regions"].output().path).read_text())
    assert summary["images"] == 30 and summary["failed"] == {}
