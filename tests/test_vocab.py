"""Vocabulary (pure parts and file contract) and the Luigi tasks ParseSentences -> BuildVocab on the demo set:
training split only, resume after a lost shard, killed writes, a new folder for a new skip set."""
import json
import time
from collections import Counter
from pathlib import Path

import luigi
import pytest
from luigi.execution_summary import LuigiStatusCode

from data import load_dataset
from pipeline.cache import list_shards, read_triple_shard
from pipeline.vocab import UNK, build_vocab, count_shards, load_vocab, save_vocab

MODELS = Path(__file__).resolve().parent / "stanza_models"


def test_build_vocab_orders_counts_and_folds_rare_words_into_unk():
    words = Counter({"dog": 7, "a": 9, "cat": 7, "zebra": 2, "ox": 4})
    rels = Counter({"det": 5, "nsubj": 3, "amod": 3, "obl:tmod": 1})
    v = build_vocab(words, rels, min_count=5, source={"triples": "x"})
    assert v.words == [UNK, "a", "cat", "dog"] and v.word_counts == [6, 9, 7, 7]
    assert v.relations == [UNK, "det", "amod", "nsubj", "obl:tmod"] and v.relation_counts == [0, 5, 3, 3, 1]
    assert v.word_id("dog") == 3 and v.word_id("zebra") == 0 and v.word_id("never") == 0
    assert v.rel_id("nsubj") == 3 and v.rel_id("acl") == 0
    assert build_vocab(Counter(dict(reversed(words.items()))), rels, 5, {"triples": "x"}).to_json() == v.to_json()
    assert build_vocab(words, rels, 2).words == [UNK, "a", "cat", "dog", "ox", "zebra"]
    with pytest.raises(ValueError):
        build_vocab(words, rels, 0)


def test_vocab_file_round_trip_key_and_bad_files(tmp_path):
    v = build_vocab(Counter({"dog": 5, "é": 6}), Counter({"det": 2}), 5, {"dataset": "demo"})
    path = save_vocab(v, tmp_path / "v" / "vocab.json")
    d = json.loads(path.read_text(encoding="utf-8"))
    assert set(d) == {"words", "word_counts", "relations", "relation_counts", "unk", "min_count", "source"}
    w = load_vocab(path)
    assert w.to_json() == v.to_json() and w.key == v.key and len(w.key) == 12
    assert build_vocab(Counter({"dog": 5, "é": 7}), Counter({"det": 2}), 5, {"dataset": "demo"}).key != v.key
    assert not list(path.parent.glob(".*tmp*"))
    with pytest.raises(FileNotFoundError, match="BuildVocab"):
        load_vocab(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"words": ["dog"], "word_counts": [1]')
    with pytest.raises(ValueError, match="bad.json"):
        load_vocab(tmp_path / "bad.json")
    d["words"] = ["dog", UNK, "é"]
    (tmp_path / "order.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="order.json.*first"):
        load_vocab(tmp_path / "order.json")


def parse_params(cache_dir, **extra):
    return {"dataset": "demo", "cache_dir": str(cache_dir), "stanza_tagger": str(MODELS / "en_ewt_tagger_small.pt"),
            "stanza_parser": str(MODELS / "en_ewt_parser_small.pt"), "shard_size": 20, "device": "cpu", **extra}


def run(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


def test_luigi_parse_then_vocab_on_the_training_split_then_resume(tmp_path):
    import tasks

    params = parse_params(tmp_path)
    vocab_task = tasks.BuildVocab(min_count=2, word_vectors="none", **params)  # counted words
    result = run(vocab_task)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text

    data = load_dataset("demo")
    folder = tasks.ParseSentences(**params).triple_folder()
    shards = list_shards(folder)
    assert len(shards) == 4  # 64 captions, 20 per shard
    assert [c for s in shards for c in read_triple_shard(s).caption_ids] == [c.caption_id for c in data.captions]

    vocab = load_vocab(vocab_task.output().path)
    train = {c.caption_id for c in data.split_captions("train")}
    words, rels, n = count_shards(shards, train)
    all_words, _, n_all = count_shards(shards, None)
    assert n == len(train) == vocab.source["train_captions"] < n_all
    assert vocab.source["triples"] == folder.name and vocab.source["dataset"]["name"] == "demo"
    assert dict(zip(vocab.words[1:], vocab.word_counts[1:])) == {w: c for w, c in words.items() if c >= 2}
    assert any(all_words[w] >= 2 > words[w] for w in all_words), "some word occurs only outside training"
    assert vocab.relations[1:] == sorted(rels, key=lambda r: (-rels[r], r))

    # resume: a lost shard is recomputed, the others are left alone
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    before = read_triple_shard(shards[2])
    shards[2].unlink()
    (folder / f".{shards[2].name}.tmp-999").write_bytes(b"half a file from a killed run")
    time.sleep(0.01)
    result = run(tasks.ParseSentences(**params))
    assert result.status == LuigiStatusCode.SUCCESS
    after = {p.name: p.stat().st_mtime_ns for p in list_shards(folder)}
    assert set(after) == set(mtimes)
    assert [n for n in after if after[n] != mtimes[n]] == [shards[2].name]
    again = read_triple_shard(shards[2])
    assert again.caption_ids == before.caption_ids and again.rel == before.rel and again.dep == before.dep
    assert f".{shards[2].name}.tmp-999" not in after  # a killed write is never listed as finished


def test_luigi_new_skip_set_gives_new_cache_without_det(tmp_path):
    import tasks

    task = tasks.ParseSentences(**parse_params(tmp_path, skip_relations="punct,root,det", shard_size=40))
    assert task.triple_folder() != tasks.ParseSentences(**parse_params(tmp_path, shard_size=40)).triple_folder()
    assert run(task).status == LuigiStatusCode.SUCCESS
    shards = list_shards(task.triple_folder())
    assert len(shards) == 2
    rels = {r for s in shards for r in read_triple_shard(s).rel}
    assert rels and "det" not in rels and "punct" not in rels
