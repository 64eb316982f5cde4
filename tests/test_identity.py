"""Cache keys and run names depend on content (model file hashes, dataset content, options), never on where the
checkout, the dataset or the model files live."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks
from pipeline.parse import ParseSettings, StanzaModelsMissing, find_model_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "stanza_models"


def copy_checkout_parts(dest: Path) -> dict:
    """The demo set and the small Stanza models copied under ``dest``, as a second clone would hold them."""
    shutil.copytree(ROOT / "data" / "demo", dest / "data" / "demo")
    (dest / "models").mkdir()
    for name in ("en_ewt_tagger_small.pt", "en_ewt_parser_small.pt"):
        shutil.copy(MODELS / name, dest / "models" / name)
    return dict(dataset=str(dest / "data" / "demo" / "captions.jsonl"),
                stanza_tagger=str(dest / "models" / "en_ewt_tagger_small.pt"),
                stanza_parser=str(dest / "models" / "en_ewt_parser_small.pt"),
                detector="torchvision-mobilenet-v3-fpn", detector_weights="random", min_count=1, epochs=2)


def names(task: tasks.TrainEmbedding) -> tuple[str, str, str]:
    up = task.requires()
    return up["regions"].region_folder().name, up["triples"].triple_folder().name, task.run_folder().name


def test_two_clones_give_the_same_cache_keys_and_run_name(tmp_path):
    a = tasks.TrainEmbedding(**copy_checkout_parts(tmp_path / "clone-a"))
    b = tasks.TrainEmbedding(**copy_checkout_parts(tmp_path / "elsewhere" / "clone-b"))
    assert names(a) == names(b)
    changed = tasks.TrainEmbedding(**{**a.param_kwargs, "min_count": 2})
    assert names(changed)[2] != names(a)[2]  # options still change the run name


def test_local_models_are_recorded_by_content_and_found_again_by_it(tmp_path):
    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"))
    models = s.models()
    assert set(models["pos"]) == {"sha256"}  # no path in the identity
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(MODELS / "en_ewt_tagger_small.pt", moved / "tagger.pt")
    assert find_model_file(models["pos"], [moved]) in (str(moved / "tagger.pt"),
                                                      str(MODELS / "en_ewt_tagger_small.pt"))
    again = ParseSettings.from_producer(s.producer())  # retrieval: models found by their sha256
    assert again.models() == models
    with pytest.raises(StanzaModelsMissing, match="--stanza-tagger PATH --stanza-parser PATH"):
        find_model_file({"sha256": "0" * 64}, [moved])
