"""Checkpoints under attack and under faults: a crafted pickle never runs, a failed or full-disk save keeps the
previous checkpoint, a damaged last checkpoint names the way out, and --resume --epochs N continues the same run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, load_model, save_checkpoint
from model.planted import synthetic_set, write_caches
from model.store import FragmentStore
from model.train import TrainConfig, run_name, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(h=16, d=8, batch_size=20, lr=1e-2, progress=False, device="cpu")


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def craft(path: Path, marker: Path, like: dict | None = None) -> Path:
    """A .pt file that looks like a checkpoint (same keys when ``like`` is given) and carries RunsCode."""
    state = dict(like or {"model": {}, "epoch": 1})
    state["model"] = {**state.get("model", {}), "payload": RunsCode(marker)}
    torch.save(state, path)
    assert not marker.exists()
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    ps = synthetic_set(60, feat_dim=16, n_concepts=12, val_fraction=0.25, seed=5)
    reg, tri, voc = write_caches(root, ps, image_shard=20, caption_shard=100)
    return ps, reg, tri, voc, FragmentStore(reg, tri, voc, ps.splits)


def _train(caches, run_dir: Path, epochs: int, **kw):
    ps, reg, tri, voc, store = caches
    return train(TrainConfig(epochs=epochs, **SMALL), reg, tri, voc, run_dir, store=store, **kw)


# ---------------------------------------------------------------------------------------------- malicious files

def test_crafted_checkpoint_is_refused_and_its_code_never_runs(caches, tmp_path):
    marker = tmp_path / "ran"
    evil = craft(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil.pt cannot be read .*not a defrag checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(evil)
    assert not marker.exists()


def test_crafted_last_checkpoint_is_refused_by_resume(caches, tmp_path):
    s = _train(caches, tmp_path, 1)
    last = Path(s["run_dir"]) / LAST
    marker = tmp_path / "ran"
    craft(last, marker, like=torch.load(last, weights_only=True))
    (Path(s["run_dir"]) / BEST).unlink()  # no way out offered: the message says to start a new run
    with pytest.raises(CheckpointError, match=r"checkpoint-last.pt cannot be read.*start a new run"):
        _train(caches, tmp_path, 2, resume=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- failed saves

def _no_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path):
    good = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 1}
    save_checkpoint(tmp_path / LAST, good, also=tmp_path / BEST)
    # the second value cannot be pickled: torch.save fails after writing the tensor records
    bad = {"model": {"w": torch.zeros(100_000)}, "epoch": 2, "hook": lambda: None}
    with pytest.raises(Exception, match="lambda|pickle"):
        save_checkpoint(tmp_path / LAST, bad, also=tmp_path / BEST)
    for name in (LAST, BEST):
        back = load_checkpoint(tmp_path / name)
        assert back["epoch"] == 1 and torch.equal(back["model"]["w"], good["model"]["w"])
    assert _no_temporaries(tmp_path) == []


FULL_DISK = textwrap.dedent("""
    import json, os, subprocess, sys, torch
    from pathlib import Path
    from model.checkpoint import LAST, BEST, CheckpointError, load_checkpoint, save_checkpoint
    d = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], check=True)
    out = {}
    save_checkpoint(d / LAST, {"epoch": 1, "model": {"w": torch.ones(1000)}}, also=d / BEST)
    real_save, writes = torch.save, []
    torch.save = lambda *a, **k: (writes.append(1), real_save(*a, **k))[1]
    def attempt(key, state):
        writes.clear()
        try:
            save_checkpoint(d / LAST, state, also=d / BEST)
            out[key] = "saved"
        except CheckpointError as e:
            out[key] = str(e)
        out[key + "_writes"] = len(writes)
    # refused before writing: the estimate (3 MiB of tensors) exceeds the free space
    attempt("estimate", {"epoch": 2, "model": {"w": torch.zeros(3 * 2**18)}})
    # passes the estimate (no tensors) but fills the disk while writing: 200k strings pickle to ~4 MB
    attempt("midway", {"epoch": 2, "model": {}, "history": [f"record {i:07d}" for i in range(200_000)]})
    out["epochs"] = [load_checkpoint(d / n)["epoch"] for n in (LAST, BEST)]
    out["files"] = sorted(p.name for p in d.iterdir())
    print(json.dumps(out))
""")


def test_full_disk_names_the_folder_and_space_and_keeps_the_previous_checkpoint(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed: the injected-ENOSPC test below covers the write path")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    sandbox = [unshare, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run(sandbox + ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here ({probe.stderr.strip()[-200:]}): the injected-ENOSPC test "
                    "below covers the write path")
    proc = subprocess.run(sandbox + [sys.executable, "-c", FULL_DISK, str(mnt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("estimate", "midway"):
        msg = out[key]
        assert msg.startswith(f"not enough space in {mnt} for the checkpoint: about "), msg
        assert "MiB needed" in msg and "MiB free" in msg and "rerun with --resume" in msg and "\n" not in msg
    assert "about 6.4 MiB needed" in out["estimate"]  # (3 MiB of tensors + 5% + 64 KiB) x two files
    assert out["estimate_writes"] == 0 and out["midway_writes"] == 1  # refused before writing; failed writing
    assert out["epochs"] == [1, 1] and out["files"] == [BEST, LAST]  # the old pair intact, no temporary file


def test_disk_full_during_the_copy_leaves_no_temporary_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / LAST, {"epoch": 1}, also=tmp_path / BEST)
    import model.checkpoint as ck

    def full(src, dst):  # the disk fills while the best copy is written (errno ENOSPC, as the OS reports it)
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(ck.shutil, "copyfile", full)
    with pytest.raises(CheckpointError, match=rf"not enough space in {tmp_path} for the checkpoint"):
        save_checkpoint(tmp_path / LAST, {"epoch": 2}, also=tmp_path / BEST)
    assert [load_checkpoint(tmp_path / n)["epoch"] for n in (LAST, BEST)] == [1, 1]
    assert _no_temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------- resume

def test_damaged_last_checkpoint_names_the_best_one(caches, tmp_path):
    s = _train(caches, tmp_path, 2)
    run = Path(s["run_dir"])
    best_epoch = load_checkpoint(run / BEST)["epoch"]
    last = run / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated file
    with pytest.raises(CheckpointError) as e:
        _train(caches, tmp_path, 3, resume=True)
    msg = str(e.value)
    assert "checkpoint-last.pt cannot be read" in msg and f"best epoch ({best_epoch})" in msg
    assert f"cp {run / BEST} {last}" in msg
    shutil.copyfile(run / BEST, last)  # the way out works
    assert _train(caches, tmp_path, 3, resume=True)["epochs"] == 3


def test_resume_with_more_epochs_continues_the_same_run(caches, tmp_path):
    ps, reg, tri, voc, store = caches
    two = _train(caches, tmp_path, 2)
    three = _train(caches, tmp_path, 3, resume=True)  # the default run name: no --run-name
    assert three["run_dir"] == two["run_dir"] and three["epochs"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [two["name"]]
    log = [json.loads(x) for x in (Path(two["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2, 3]
    straight = _train(caches, tmp_path / "straight", 3)  # and it equals three epochs in one go
    a, b = (torch.load(Path(x["run_dir"]) / LAST, weights_only=True) for x in (three, straight))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert run_name(TrainConfig(epochs=2), store.cache_keys, "v") == run_name(TrainConfig(epochs=7),
                                                                               store.cache_keys, "v")
    assert run_name(TrainConfig(lr=0.5), store.cache_keys, "v") != run_name(TrainConfig(), store.cache_keys, "v")
    with pytest.raises(CheckpointError, match="--resume"):  # without --resume the finished run is kept
        _train(caches, tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"already trained 3 epochs, more than --epochs 2"):
        _train(caches, tmp_path, 2, resume=True)
