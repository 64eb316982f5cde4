"""The real Stanza Pipeline on the project's small English models (tests/stanza_models/): demo captions, UD
sentences, bad input, settings and the cache key, the missing-models error."""
import json
from pathlib import Path

import pytest
from stanza.utils.conll import CoNLL

from data import load_dataset
from pipeline.cache import read_triple_shard
from pipeline.parse import (ParseSettings, StanzaModelsMissing, get_pipeline, parse_captions, parse_shard,
                            parse_texts, prepare, regex_tokenize, triple_cache_folder)
from pipeline.triples import document_triples

MODELS = Path(__file__).resolve().parent / "stanza_models"
EWT_TEST = Path(__file__).resolve().parent / "data" / "ud_english_ewt" / "en_ewt-ud-test.conllu"


@pytest.fixture(scope="session")
def settings() -> ParseSettings:
    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                      device="cpu", batch_size=64)
    get_pipeline(s, pretokenized=True)  # built once per session; every later call reuses it
    return s


def test_pipeline_is_built_once_and_reused(settings):
    assert get_pipeline(settings, True) is get_pipeline(ParseSettings(**settings.describe()), True)


def test_demo_captions_parse_into_triples(settings):
    data = load_dataset("demo")
    caps = data.captions
    out = parse_captions([c.text for c in caps], [c.tokens for c in caps], settings)
    assert len(out.triples) == len(caps) and not out.failed
    for c, triples, n in zip(caps, out.triples, out.num_tokens):
        words = regex_tokenize(c.text)
        assert n == len(words) and triples, c.caption_id
        for t in triples:  # every triple points at its own words, lowercased
            assert t.dep == words[t.dep_pos - 1].lower() and t.dep_pos != t.head_pos
            assert t.head_pos == 0 or t.head == words[t.head_pos - 1].lower()
            assert t.rel == t.rel.lower() and t.rel not in ("punct", "root")
    # the small tagger knows determiners: most "a"/"the" attach as det
    dets = [t.rel == "det" for ts in out.triples for t in ts if t.dep in ("a", "an", "the")]
    assert sum(dets) / len(dets) > 0.8


def test_bulk_gives_the_same_triples_as_one_call_per_caption(settings):
    texts = [c.text for c in load_dataset("demo").captions[:12]]
    bulk = parse_texts(texts, settings)
    assert bulk == [parse_texts([t], settings)[0] for t in texts]


def test_ud_sentences_recover_most_gold_triples(settings):
    """Parse 150 EWT test sentences from their gold tokens; compare (rel, head, dep) with the gold parse."""
    if not EWT_TEST.exists():
        pytest.skip(f"UD English EWT not found at {EWT_TEST}")
    blocks = [b for b in EWT_TEST.read_text(encoding="utf-8").split("\n\n") if "# text = " in b][:150]
    gold = CoNLL.conll2doc(input_str="\n\n".join(blocks) + "\n\n")
    tokens = [[w.text for w in s.words] for s in gold.sentences]
    out = parse_captions([" ".join(t) for t in tokens], tokens, settings)
    hit = total = 0
    for sent, pred in zip(gold.sentences, out.triples):
        want = {(t.rel, t.head_pos, t.dep_pos) for t in document_triples(type("D", (), {"sentences": [sent]}))[0]}
        got = {(t.rel, t.head_pos, t.dep_pos) for t in pred}
        hit, total = hit + len(want & got), total + len(want)
    # 1230/2485 = 0.495 with the committed models (deterministic on CPU)
    assert total > 1500 and hit / total > 0.42, f"{hit}/{total} gold triples recovered"


def test_bad_captions_never_stop_a_shard(settings):
    texts = ["", "   \n\t ", "!!! ... ?!", "🐶🐶🐶", "dog " * 2000, "A cat 🐱 sits on a mat 😀",
             "一只狗在草地上奔跑", "Собака бежит по траве.", "A <b>dog</b> &amp; a cat<br/>on a sofa &lt;3",
             "A dog runs."]
    out = parse_captions(texts, None, settings)
    assert not out.failed
    for i in range(4):  # no word character: recorded with no triples, not parsed
        assert out.triples[i] == [] and out.num_tokens[i] == 0 and not out.truncated[i]
    assert out.truncated[4] and out.num_tokens[4] == settings.max_tokens and out.triples[4]
    assert not any(out.truncated[5:])
    assert all(out.triples[i] for i in (5, 7, 8, 9))
    assert out.num_tokens[6] == 1 and out.triples[6] == []  # unspaced Chinese is one token: its root, skipped
    words = {w for t in out.triples[8] for w in (t.head, t.dep)}
    assert {"dog", "cat", "sofa"} <= words and not any("<" in w or "amp" in w for w in words)
    assert {"🐱", "😀"} & {t.dep for t in out.triples[5]} or out.num_tokens[5] == 8


def test_given_tokens_are_parsed_as_given(settings):
    out = parse_captions(["ignored text here", "a dog"], [("two", "dogs", "play", "."), None], settings)
    assert out.num_tokens == [4, 2]
    assert {t.dep for t in out.triples[0]} <= {"two", "dogs", "play"}
    no_given = ParseSettings(**{**settings.describe(), "use_given_tokens": False})
    assert prepare("a cat sleeps", ("x", "y"), no_given).tokens == ["a", "cat", "sleeps"]


def test_shard_round_trip_and_settings_from_its_producer(settings, tmp_path):
    data = load_dataset("demo")
    folder = triple_cache_folder(tmp_path, data, settings, shard_size=10)
    path = parse_shard(data, 10, 20, folder / "shard-00001.h5", settings, 1, 7)
    block = read_triple_shard(path, settings.producer(), data.describe())
    assert block.caption_ids == [c.caption_id for c in data.captions[10:20]]
    assert block.texts == [c.text for c in data.captions[10:20]]
    assert len(block.offsets) == 11 and block.offsets[-1] == len(block.rel) > 0
    again = ParseSettings.from_producer(read_producer(path), device="cpu")
    assert again.producer() == settings.producer()
    assert parse_texts([block.texts[0]], again)[0] == [tuple(t) for t in zip(
        block.rel, block.head, block.dep, block.head_lemma, block.dep_lemma, block.head_pos, block.dep_pos)][
        : int(block.offsets[1])]


def read_producer(path):
    import json

    import h5py

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["producer"])


def test_cache_key_follows_what_changes_the_triples(settings, tmp_path):
    data = load_dataset("demo")
    base = triple_cache_folder(tmp_path, data, settings, 10)
    same = ParseSettings(**{**settings.describe(), "batch_size": 7, "device": "cuda"})
    assert triple_cache_folder(tmp_path, data, same, 10) == base
    for change in ({"skip_relations": ("punct",)}, {"max_tokens": 40}, {"use_given_tokens": False}):
        other = ParseSettings(**{**settings.describe(), **change})
        assert triple_cache_folder(tmp_path, data, other, 10) != base, change
    assert triple_cache_folder(tmp_path, data, settings, 20) != base
    p = settings.producer()
    assert p["stanza"] and p["processors"] == "tokenize,pos,lemma,depparse"
    assert len(p["models"]["pos"]["sha256"]) == 64 and p["skip_relations"] == ["punct", "root"]


def test_missing_models_fail_at_once_naming_the_fix(tmp_path):
    s = ParseSettings(stanza_dir=str(tmp_path / "no-models"))
    with pytest.raises(StanzaModelsMissing) as e:
        s.producer()
    msg = str(e.value)
    assert "--stanza-dir" in msg and "stanza.download('en'" in msg and str(tmp_path / "no-models") in msg
    with pytest.raises(StanzaModelsMissing):
        get_pipeline(s, pretokenized=False)
    (tmp_path / "no-models").mkdir()
    (tmp_path / "no-models" / "resources.json").write_text('{"en": {"lang_name": "English"}}')
    with pytest.raises(StanzaModelsMissing, match="--stanza-dir"):
        ParseSettings(stanza_dir=str(tmp_path / "no-models")).producer()
    with pytest.raises(StanzaModelsMissing, match="--stanza-tagger"):
        ParseSettings(tagger=str(tmp_path / "x.pt"), parser=str(tmp_path / "y.pt")).producer()
    with pytest.raises(ValueError, match="both"):
        ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"))


def test_package_models_named_by_resources_json(tmp_path):
    """A resources folder laid out as stanza.download leaves it: the package resolves to one model file per
    processor, named in the cache key by resources.json's md5; a missing file is named in the error."""
    procs = {"tokenize": "combined", "pos": "combined_charlm", "lemma": "combined_nocharlm",
             "depparse": "combined_charlm"}
    en = {"lang_name": "English", "packages": {"default": procs}, "default_processors": procs}
    en.update({p: {m: {"md5": f"md5-{p}"}} for p, m in procs.items()})
    (tmp_path / "resources.json").write_text(json.dumps({"en": en}))
    for p, m in procs.items():
        (tmp_path / "en" / p).mkdir(parents=True)
        if p != "depparse":
            (tmp_path / "en" / p / f"{m}.pt").write_bytes(b"")
    with pytest.raises(StanzaModelsMissing, match="depparse/combined_charlm.pt does not exist.*--stanza-dir"):
        ParseSettings(stanza_dir=str(tmp_path)).producer()
    (tmp_path / "en" / "depparse" / "combined_charlm.pt").write_bytes(b"")
    p = ParseSettings(stanza_dir=str(tmp_path)).producer()
    assert p["models"] == {"package": "default", **{k: {"package": m, "md5": f"md5-{k}"} for k, m in procs.items()}}
    assert p["lemmatizer"] == "stanza" and p["tokenizer"] == "stanza"
