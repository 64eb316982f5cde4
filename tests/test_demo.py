"""The demo set shows the idea: the test photos' words are known from training captions, so retrieval and the
alignment pictures speak in words, not <unk>."""
from collections import Counter
from pathlib import Path

from data import load_dataset
from pipeline.parse import ParseSettings, parse_texts

MODELS = Path(__file__).resolve().parent / "stanza_models"
MIN_COUNT = 1  # the README's demo settings (--min-count 1)


def test_most_test_caption_triples_are_in_the_training_vocabulary():
    ds = load_dataset("demo")
    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                      device="cpu")
    triples = parse_texts([c.text for c in ds.captions], s)
    split = {im.image_id: im.split for im in ds.images}
    words, relations = Counter(), set()
    for c, ts in zip(ds.captions, triples):
        if split[c.image_id] == "train":
            words.update(w for t in ts for w in (t.head, t.dep))
            relations.update(t.rel for t in ts)
    known = {w for w, n in words.items() if n >= MIN_COUNT}
    per_image: dict[str, list[bool]] = {}
    for c, ts in zip(ds.captions, triples):
        if split[c.image_id] == "test":
            per_image.setdefault(c.image_id, []).extend(
                t.rel in relations and t.head in known and t.dep in known for t in ts)
    assert len(per_image) == 2
    every = [k for ks in per_image.values() for k in ks]
    assert sum(every) >= 0.8 * len(every), f"{sum(every)} of {len(every)} test triples known"
    for image, ks in per_image.items():  # each test photo, not just on average
        assert sum(ks) >= 0.6 * len(ks), f"{image}: {sum(ks)} of {len(ks)} triples known"
