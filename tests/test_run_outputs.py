"""Evaluation files, the HTML report (loaded in headless Chromium) and the retrieve CLI on a small real run
(tests/small_run.py: the real detector and parser, trained with --smooth 1). Expected scores are computed here
with smooth 1 written out, never read back from the run."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from model.evaluate import first_captions, retrieval_metrics
from model.objective import pair_scores
from model.report import build_report, report_images
from model.retrieve import main as retrieve_main
from model.checkpoint import load_model
from model.runs import evaluate_split, open_run, split_scores, write_evaluation
from model.store import encode
from small_run import SMOOTH, build_small_run

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = build_small_run(tmp_path_factory.mktemp("small-run"))
    return open_run(folder)


def _scores(run, smooth: float, split_name: str = "test", threshold: bool = True):
    """(n_images, n_captions) S_kl of a split, in one block (no chunking): an independent path."""
    split = run.store.split(split_name)
    iv, io, sv, so = encode(run.model, split)
    return pair_scores(iv, io, split.n_images, sv, so, split.n_captions, smooth=smooth, threshold=threshold)


def test_evaluation_files_match_metrics_of_the_objective(run):
    js, md = write_evaluation(run, "test")
    result = json.loads(js.read_text())
    split = run.store.split("test")
    keep = first_captions(split.caption_image, 5)
    expect = retrieval_metrics(_scores(run, SMOOTH)[:, keep], split.caption_image[keep])
    for d in ("annotation", "search"):
        assert result["all"][d] == pytest.approx(expect[d])
    assert result["score"] == {"smooth": 1.0, "threshold": True}
    assert result["all"]["n_images"] == 2 and result["all"]["n_captions"] == 9
    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Model"))
    assert header == ("| Model | Image Annotation R@1 | R@5 | R@10 | Med r | Image Search R@1 | R@5 | R@10 "
                      "| Med r |")
    row = lines[lines.index(header) + 2]
    assert f"| {100 * expect['annotation']['r1']:.1f} |" in row
    assert not list(run.folder.glob(".*tmp*"))


def test_evaluation_and_validation_score_with_the_runs_own_smooth(run):
    for name in ("test", "train"):  # 10 train images: there smooth 1 and 10 rank captions differently
        split = run.store.split(name)
        torch.testing.assert_close(split_scores(run, split), _scores(run, SMOOTH, name))
        result = evaluate_split(run, name, captions_per_image=0)
        expect = retrieval_metrics(_scores(run, SMOOTH, name), split.caption_image)
        assert result["all"]["annotation"] == pytest.approx(expect["annotation"])
    # a run trained with --threshold-global false is scored with plain dots
    import dataclasses

    plain = dataclasses.replace(run, checkpoint={**run.checkpoint,
                                                 "config": {**run.checkpoint["config"], "threshold_global": False}})
    torch.testing.assert_close(split_scores(plain, run.store.split("test")), _scores(run, SMOOTH, threshold=False))
    # the val recalls logged during training: the last checkpoint's model, smooth 1
    model, ckpt = load_model(run.folder, which="last")
    val = run.store.split("val")
    iv, io, sv, so = encode(model, val)
    expect = retrieval_metrics(pair_scores(iv, io, val.n_images, sv, so, val.n_captions, smooth=SMOOTH),
                               val.caption_image)
    logged = ckpt["history"][-1]["val"]
    for d in ("annotation", "search"):
        assert {k: logged[d][k] for k in expect[d]} == pytest.approx(expect[d])


@pytest.fixture(scope="module")
def report(run):
    return build_report(run, "test", n_queries=2, top=3)


def test_report_is_self_contained(report):
    folder = report.parent
    assert folder.name == "report"
    text = report.read_text()
    srcs = report_images(report)
    assert "curves.png" in srcs
    assert sum(s.startswith("align/") for s in srcs) >= 4  # both directions, a picture per query at least
    for link in re.findall(r"(?:src|href)='([^']*)'", text):
        assert not re.match(r"^(/|[a-z]+:)", link), f"absolute link {link}"
        assert (folder / link).is_file(), link
    assert "Image Annotation R@1" in text and "Image Search R@1" in text
    assert not list(folder.parent.glob(".report*"))


def test_report_rebuild_replaces_the_folder(run, report):
    stale = report.parent / "images" / "stale.jpg"
    stale.write_bytes(b"x")
    again = build_report(run, "test", n_queries=2, top=3)
    assert again == report and not stale.exists()  # same queries (seeded): the folder the others check


def test_a_failed_report_build_leaves_no_folder_and_old_ones_are_cleared(run, tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.tmp-{int(gone.stdout)}"  # a build killed with -9: its process is gone
    (stale / "images").mkdir(parents=True)
    with pytest.raises(ValueError):
        build_report(run, "test", out_dir=tmp_path / "report", n_queries=2, top=3, seed=-1)  # fails midway
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (stale / "images").mkdir(parents=True)
    index = build_report(run, "test", out_dir=tmp_path / "report", n_queries=2, top=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    options = json.loads((index.parent / "options.json").read_text())
    assert options["image_root"] == str(run.dataset.image_root) and options["top"] == 3


def test_report_loads_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed: {INSTALL}")
    folder = report.parent
    check = folder / "check-images.html"  # a copy of the page in the same folder, so relative paths resolve
    script = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.getAttribute("src"); });
  var d = document.createElement("pre"); d.id = "img-check";
  d.textContent = JSON.stringify({total: imgs.length, broken: bad});
  document.body.appendChild(d);
});
</script></body>"""
    check.write_text(report.read_text().replace("</body>", script))
    try:
        out = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             check.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        check.unlink()
    m = re.search(r'<pre id="img-check">(.*?)</pre>', out.stdout)
    assert m, f"Chromium did not run the check (rc {out.returncode}): {out.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result["broken"] == [] and result["total"] == len(report_images(report))


def test_retrieve_ranks_captions_for_an_image(run, capsys):
    assert retrieve_main(["--run", str(run.folder), "--image", "retina.jpg", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Captions of the test split for image retina.jpg")
    rows = [line for line in out.splitlines() if re.match(r"^\d+\s", line)]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    split = run.store.split("test")
    row = _scores(run, SMOOTH)[split.image_ids.index("retina.jpg")]
    top = row.topk(3).values.tolist()  # the three best captions of the split, by S_kl with smooth 1
    assert [float(r.split()[1]) for r in rows] == pytest.approx(top, rel=1e-3, abs=1e-4)


def test_retrieve_json_matches_the_score_matrix(run, capsys):
    assert retrieve_main(["--run", str(run.folder), "--image", "grass.png", "--top", "9", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    split = run.store.split("test")
    row = _scores(run, SMOOTH)[split.image_ids.index("grass.png")]
    assert len(res["results"]) == 9
    for r in res["results"]:
        assert r["score"] == pytest.approx(float(row[split.caption_ids.index(r["id"])]), rel=1e-5)
        assert r["own"] == r["id"].startswith("grass.png#")


@pytest.mark.parametrize("args, message", [
    (["--image", "no-such.jpg"], "is not among the 14 images"),
    (["--image", "astronaut.png"], "pass --split train"),
    (["--text", "   "], "the sentence is empty"),
    (["--text", "Rocket"], "no dependency triples"),  # parsed with the cache's parser: one word, no relation
])
def test_retrieve_bad_queries_get_a_message(run, capsys, args, message):
    assert retrieve_main(["--run", str(run.folder)] + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_retrieve_missing_run(tmp_path, capsys):
    assert retrieve_main(["--run", str(tmp_path / "nothing"), "--image", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_retrieve_explain_writes_the_picture(run, tmp_path, capsys):
    png = tmp_path / "top.png"
    assert retrieve_main(["--run", str(run.folder), "--image", "retina.jpg", "--explain", str(png)]) == 0
    assert f"alignment picture: {png}" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(png).size[0] == 900


def test_retrieve_refuses_a_crafted_checkpoint_without_running_it(run, tmp_path, capsys):
    from test_checkpoints import craft

    copy = tmp_path / run.folder.name
    shutil.copytree(run.folder, copy, ignore=shutil.ignore_patterns("report"))
    marker = tmp_path / "ran"
    craft(copy / "checkpoint-best.pt", marker, like=torch.load(copy / "checkpoint-best.pt", weights_only=True))
    assert retrieve_main(["--run", str(copy), "--image", "retina.jpg"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-best.pt cannot be read" in err and "Traceback" not in err
    assert not marker.exists()


def test_evaluating_a_missing_split_names_the_one_to_use(run):
    import copy
    import dataclasses

    from model.runs import RunError

    store = copy.copy(run.store)  # the same run on a dataset without a test split
    store.splits = {**run.store.splits, "test": run.store.split("test").subset([])}
    with pytest.raises(RunError, match=r"split 'test' .* 0 images .*evaluate another split \(--split val, "
                                       r"--split train\)"):
        evaluate_split(dataclasses.replace(run, store=store), "test")


def test_open_run_without_dataset_record(run, tmp_path):
    copy = tmp_path / run.folder.name
    shutil.copytree(run.folder, copy, ignore=shutil.ignore_patterns("dataset.json", "report"))
    from model.runs import RunError

    with pytest.raises(RunError, match="pass --dataset"):
        open_run(copy)
    assert open_run(copy, dataset="demo").store.split("test").n_images == 2


def _copy_run(run, tmp_path) -> Path:
    copy = tmp_path / run.folder.name
    shutil.copytree(run.folder, copy, ignore=shutil.ignore_patterns("report"))
    return copy


def test_a_checkpoint_file_given_is_the_one_loaded(run):
    best, last = (torch.load(run.folder / f, weights_only=True) for f in ("checkpoint-best.pt", "checkpoint-last.pt"))
    assert best["epoch"] != last["epoch"]  # the small run's best epoch is not its last one
    for name, want in (("checkpoint-last.pt", last), ("checkpoint-best.pt", best)):
        opened = open_run(run.folder / name)
        assert opened.checkpoint["epoch"] == want["epoch"]
        torch.testing.assert_close(opened.model.state_dict(), want["model"])


def test_a_checkpoint_of_other_caches_is_refused(run, tmp_path, capsys):
    # a checkpoint copied in from a run over another region cache: same vocabulary, other features
    copy = _copy_run(run, tmp_path)
    ckpt = torch.load(copy / "checkpoint-best.pt", weights_only=True)
    ckpt["cache_keys"] = {**ckpt["cache_keys"], "regions": "demo-0123456789ab"}
    torch.save(ckpt, copy / "checkpoint-best.pt")
    assert retrieve_main(["--run", str(copy), "--image", "retina.jpg"]) == 2
    err = capsys.readouterr().err
    assert "trained on the regions cache 'demo-0123456789ab'" in err and run.checkpoint["cache_keys"]["regions"] in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ([1, 2], "holds a list"),
    ({"epoch": 3}, "holds keys ['epoch']"),
    ("resized", "does not rebuild a DeFrag model (RuntimeError: Error(s) in loading state_dict"),
])
def test_a_checkpoint_that_is_not_a_defrag_one_is_named(run, tmp_path, capsys, content, message):
    copy = _copy_run(run, tmp_path)
    if content == "resized":  # a checkpoint of another model size under the same config
        content = torch.load(copy / "checkpoint-best.pt", weights_only=True)
        w = content["model"]["image_proj.weight"]
        content["model"]["image_proj.weight"] = w[:, :-1]
    torch.save(content, copy / "checkpoint-best.pt")
    assert retrieve_main(["--run", str(copy), "--image", "retina.jpg"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-best.pt" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("text, message", [('{"name": "defrag-', "config.json cannot be read (JSONDecodeError"),
                                           ("[]", "config.json is not a run's config"),
                                           ('{"sources": {"regions": 5}}', "config.json is not a run's config")])
def test_a_damaged_run_config_is_named(run, tmp_path, capsys, text, message):
    copy = _copy_run(run, tmp_path)
    (copy / "config.json").write_text(text)
    assert retrieve_main(["--run", str(copy), "--image", "retina.jpg"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_checkpoint_outside_a_run_folder_is_named(run, tmp_path, capsys):
    shutil.copyfile(run.folder / "checkpoint-best.pt", tmp_path / "loose.pt")
    assert retrieve_main(["--run", str(tmp_path / "loose.pt"), "--image", "retina.jpg"]) == 2
    assert "loose.pt is not inside a run folder" in capsys.readouterr().err


def test_retrieve_explain_into_a_folder_is_named_and_leaves_nothing(run, tmp_path, capsys):
    assert retrieve_main(["--run", str(run.folder), "--image", "retina.jpg", "--explain", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder: give the picture a file name" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob(f".{tmp_path.name}*"))


def test_a_long_query_is_not_echoed_whole(run, capsys):
    text = "Rocket" + "!" * 20000  # no triples: the error quotes the query
    assert retrieve_main(["--run", str(run.folder), "--text", text]) == 2
    err = capsys.readouterr().err
    assert "no dependency triples" in err and "(+19886 characters)" in err and len(err) < 1000


def test_retrieve_on_a_dataset_outside_the_runs_caches_says_so(run, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"image": "elsewhere.jpg", "caption": "a dog runs", "split": "test"}) + "\n")
    assert retrieve_main(["--run", str(run.folder), "--dataset", str(other), "--image-root", str(tmp_path),
                          "--text", "a dog runs on the grass"]) == 2
    err = capsys.readouterr().err
    assert "the test split holds none of the 14 images of run" in err and "Traceback" not in err


def test_a_run_without_checkpoints_says_so_first(run, tmp_path, capsys):
    copy = _copy_run(run, tmp_path)
    for f in ("checkpoint-best.pt", "checkpoint-last.pt", "dataset.json"):  # as a failed first epoch leaves it
        (copy / f).unlink()
    assert retrieve_main(["--run", str(copy), "--image", "retina.jpg"]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint (checkpoint-best.pt): its training has not finished an epoch" in err
