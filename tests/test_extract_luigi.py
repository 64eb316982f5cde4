"""ExtractRegions through Luigi: a local run, failures summarised, resume after kill -9, and a real luigid with
two worker processes sharing the shards."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest
from PIL import Image

from pipeline import cache
from tasks import ExtractRegions

ROOT = Path(__file__).resolve().parents[1]
# The same small random MobileNet as tests/test_regions.py: one detector per process serves both files.
PARAMS = dict(detector="torchvision-mobilenet-v3-fpn", detector_weights="random", max_image_side=256,
              min_size=128, max_size=192, device="cpu")
CLI = [sys.executable, "-m", "luigi", "--module", "tasks", "ExtractRegions", "--dataset", "demo",
       "--detector", PARAMS["detector"], "--detector-weights", "random", "--max-image-side", "256",
       "--min-size", "128", "--max-size", "192", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _build(task) -> luigi.LuigiStatusCode:
    return luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING").status


def _shards(task) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in cache.list_shards(task.region_folder())}


def test_local_run_writes_every_shard_once_and_never_recomputes(tmp_path):
    task = ExtractRegions(dataset="demo", cache_dir=str(tmp_path), shard_size=5, **PARAMS)
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    first = _shards(task)
    assert list(first) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    blocks = [cache.read_region_shard(task.region_folder() / n) for n in first]
    ids = [i for b in blocks for i in b.image_ids]
    assert ids == [im.image_id for im in task.dataset_records().images]
    summary = json.loads(task.output().open().read())
    assert summary["images"] == 14 and summary["failed"] == {}
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    assert _shards(task) == first  # complete: nothing rewritten
    other = ExtractRegions(dataset="demo", cache_dir=str(tmp_path), shard_size=5, **{**PARAMS, "seed": 1})
    assert other.region_folder() != task.region_folder()  # new content, new folder


@pytest.fixture()
def broken_dataset(tmp_path):
    Image.open(ROOT / "data/demo/images/coins.png").save(tmp_path / "coins.png")
    (tmp_path / "notes.jpg").write_text("not an image")
    lines = [{"image": "coins.png", "caption": "coins", "split": "train"},
             {"image": "notes.jpg", "caption": "a note", "split": "train"},
             {"image": "gone.jpg", "caption": "nothing", "split": "test"}]
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_failures_are_summarised_or_fatal_on_request(broken_dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    task = ExtractRegions(dataset=str(broken_dataset), cache_dir=str(cache_dir), **PARAMS)
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    summary = json.loads(task.output().open().read())
    assert summary["images"] == 1 and set(summary["failed"]) == {"notes.jpg", "gone.jpg"}
    assert "not an image" in summary["failed"]["notes.jpg"] and "not found" in summary["failed"]["gone.jpg"]

    strict = ExtractRegions(dataset=str(broken_dataset), cache_dir=str(tmp_path / "strict"), on_error="fail",
                            **PARAMS)
    assert _build(strict) == luigi.LuigiStatusCode.FAILED
    assert not cache.list_shards(strict.region_folder()) and not strict.output().exists()


def test_images_that_appear_after_a_run_are_extracted_by_the_next(broken_dataset, tmp_path):
    # gone.jpg was missing (a wrong --image-root, a file copied in later); once it is there, the same command
    # extracts its shard again: the cached "file not found" does not stick. The other shards are kept.
    task = ExtractRegions(dataset=str(broken_dataset), cache_dir=str(tmp_path / "cache"), shard_size=1, **PARAMS)
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    first = _shards(task)
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS and _shards(task) == first  # nothing appeared: kept
    Image.open(ROOT / "data/demo/images/rocket.jpg").save(tmp_path / "gone.jpg")
    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    again = _shards(task)
    assert again["shard-00002.h5"] != first["shard-00002.h5"]  # gone.jpg's shard, extracted again
    assert {k: v for k, v in again.items() if k != "shard-00002.h5"} == \
        {k: v for k, v in first.items() if k != "shard-00002.h5"}
    summary = json.loads(task.output().open().read())
    assert summary["images"] == 2 and set(summary["failed"]) == {"notes.jpg"}  # the summary follows


def test_an_image_root_holding_none_of_the_images_stops_the_preflight(tmp_path):
    from pipeline import doctor

    (tmp_path / "empty").mkdir()
    task = ExtractRegions(dataset="demo", image_root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"),
                          **PARAMS)
    with pytest.raises(doctor.PreflightError, match=r"none of the 14 images of dataset demo is in the image folder"):
        task.complete()
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_resume_after_kill_redoes_only_unfinished_shards(tmp_path):
    args = CLI + ["--cache-dir", str(tmp_path), "--shard-size", "1", "--local-scheduler"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    task = ExtractRegions(dataset="demo", cache_dir=str(tmp_path), shard_size=1, **PARAMS)
    deadline = time.monotonic() + 120
    try:
        while len(_shards(task)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9, mid-run
        proc.wait()
    before = _shards(task)
    assert 3 <= len(before) < 14, f"the run was not caught mid-way: {len(before)} shards"
    for name in before:  # everything that looks finished is finished
        assert len(cache.read_region_shard(task.region_folder() / name).image_ids) == 1

    assert _build(task) == luigi.LuigiStatusCode.SUCCESS
    after = _shards(task)
    assert len(after) == 14 and all(after[n] == t for n, t in before.items())  # finished shards untouched
    assert not [p.name for p in task.region_folder().iterdir() if ".tmp" in p.name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture()
def luigid(tmp_path):
    port = _free_port()
    (tmp_path / "luigid-logs").mkdir()
    # luigid of the running interpreter (a venv's python works without an activated venv or luigid on PATH)
    server = [sys.executable, "-c", "from luigi.cmdline import luigid; luigid()"]
    proc = subprocess.Popen(server + ["--port", str(port), "--logdir", str(tmp_path / "luigid-logs"),
                                      "--state-path", str(tmp_path / "luigid-state.pickle")], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("luigid did not start")
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow
def test_two_workers_through_luigid_produce_each_shard_once(luigid, tmp_path):
    args = CLI + ["--cache-dir", str(tmp_path / "cache"), "--shard-size", "2", "--scheduler-host", "localhost",
                  "--scheduler-port", str(luigid), "--workers", "1", "--no-lock"]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as out:
            procs.append(subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT))
    for p in procs:  # 0, or "not run by this worker" (10, 25: luigi.cfg [retcode]) when the other one ran the root
        assert p.wait(timeout=240) in (0, 10, 25)
    full_logs = sorted((tmp_path / "cache" / "logs").glob("*.log"))  # the terminal shows only the short log
    assert full_logs
    done = [m for log in full_logs
            for m in re.findall(r"done\s+ExtractRegionShard\(.*?shard_index=(\d+)\)", log.read_text())]
    assert sorted(map(int, done)) == list(range(7)), done  # every shard run exactly once, by one worker
    task = ExtractRegions(dataset="demo", cache_dir=str(tmp_path / "cache"), shard_size=2, **PARAMS)
    assert len(_shards(task)) == 7 and task.complete()
    again = subprocess.run(CLI + ["--cache-dir", str(tmp_path / "cache"), "--shard-size", "2", "--local-scheduler"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr  # everything complete: success
