"""The trainer on planted caches: it learns, resumes bit-for-bit, refuses foreign checkpoints, streams."""
from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, load_model
from model.batches import epoch_batches
from model.defrag import DeFrag
from model.planted import synthetic_set, write_caches
from model.store import FragmentStore
from model.train import TrainConfig, _window_groups, train, validate
from objective_reference import loop_cost

SMALL = dict(h=32, d=16, batch_size=20, lr=1e-2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    ps = synthetic_set(150, feat_dim=32, n_concepts=30, val_fraction=0.2, seed=3)
    reg, tri, voc = write_caches(root, ps, image_shard=40, caption_shard=200)
    return ps, reg, tri, voc


def _store(caches, **kw):
    ps, reg, tri, voc = caches
    return FragmentStore(reg, tri, voc, ps.splits, **kw)


def test_training_lowers_loss_and_raises_recall(caches, tmp_path):
    ps, reg, tri, voc = caches
    cfg = TrainConfig(epochs=4, **SMALL)
    store = _store(caches)
    torch.manual_seed(cfg.seed)
    untrained = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d)
    before = validate(untrained, store.split("val"), cfg, torch.device("cpu"))
    summary = train(cfg, reg, tri, voc, tmp_path, store=store)
    run = tmp_path / summary["name"]
    epochs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]
    after = summary["best"]["val"]
    assert after["rsum"] > before["rsum"] + 100  # out of 600; chance on 30 images is about 60
    assert after["search"]["r1"] > 2 * before["search"]["r1"]
    for name in (LAST, BEST, "curves.png", "config.json", "summary.json"):
        assert (run / name).stat().st_size > 0
    # the best checkpoint rebuilds the model (weights_only load) and scores as it did
    model, ckpt = load_model(run, "cpu")
    assert ckpt["epoch"] == summary["best"]["epoch"]
    again = validate(model, store.split("val"), cfg, torch.device("cpu"))
    assert again["rsum"] == pytest.approx(after["rsum"])
    torch.load(run / LAST, weights_only=True)


def test_resume_equals_uninterrupted(caches, tmp_path):
    ps, reg, tri, voc = caches
    store = _store(caches)
    straight = train(TrainConfig(epochs=2, **SMALL), reg, tri, voc, tmp_path / "a", store=store)
    train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path / "b", store=store,
          run_name_=straight["name"])
    resumed = train(TrainConfig(epochs=2, **SMALL), reg, tri, voc, tmp_path / "b", store=store,
                    run_name_=straight["name"], resume=True)
    a = torch.load(tmp_path / "a" / straight["name"] / LAST, weights_only=True)
    b = torch.load(tmp_path / "b" / straight["name"] / LAST, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    assert resumed["last"]["loss"] == straight["last"]["loss"]
    log_b = [json.loads(x) for x in (tmp_path / "b" / straight["name"] / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_b if r["kind"] == "epoch"] == [1, 2]


def test_checkpoint_refusals(caches, tmp_path):
    ps, reg, tri, voc = caches
    store = _store(caches)
    s = train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path, store=store)
    last = tmp_path / s["name"] / LAST
    ok = load_checkpoint(last, store.vocab.key, store.cache_keys)
    assert ok["vocab_key"] == store.vocab.key
    with pytest.raises(CheckpointError, match=rf"vocabulary '{store.vocab.key}'.*vocabulary 'other'"):
        load_checkpoint(last, expect_vocab_key="other")
    with pytest.raises(CheckpointError, match=rf"regions cache '{reg.name}'.*reads 'elsewhere-1'"):
        load_checkpoint(last, expect_cache_keys={"regions": "elsewhere-1"})
    # the same run folder: no silent overwrite, and no resume with other options
    with pytest.raises(CheckpointError, match="--resume"):
        train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path, store=store, run_name_=s["name"])
    with pytest.raises(CheckpointError, match=r"other options.*'lr': \(0.01, 0.5\)"):
        train(TrainConfig(epochs=2, **{**SMALL, "lr": 0.5}), reg, tri, voc, tmp_path, store=store,
              run_name_=s["name"], resume=True)
    # a store over another vocabulary refuses to resume the run
    other = synthetic_set(150, feat_dim=32, n_concepts=31, val_fraction=0.2, seed=3)
    reg2, tri2, voc2 = write_caches(tmp_path / "other", other, image_shard=40, caption_shard=200)
    store2 = FragmentStore(reg, tri, voc2, ps.splits)
    with pytest.raises(CheckpointError, match="vocabulary"):
        train(TrainConfig(epochs=2, **SMALL), reg, tri, voc2, tmp_path, store=store2, run_name_=s["name"],
              resume=True)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged.pt cannot be read"):
        load_checkpoint(damaged)


def first_batch_loss(store: FragmentStore, cfg: TrainConfig, batch_store: FragmentStore | None = None,
                     model: DeFrag | None = None, epoch: int = 0) -> list[float]:
    """Loss, fragment and global terms per pair of the trainer's first batch of an epoch, recomputed here: the
    same model (default: the initialisation) and batch, in-memory features, and the loop-by-definition objective
    (tests/objective_reference)."""
    if model is None:
        torch.manual_seed(cfg.seed)
        model = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d,
                       shared_relation=cfg.shared_relation)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # the epoch's batches: (seed, epoch)
    groups = _window_groups(batch_store.split("train"), batch_store, gen) if batch_store is not None else None
    split = store.split("train")
    caps = epoch_batches(split.caption_image, cfg.batch_size, gen, groups)[0]
    feats, mask = split.images(split.caption_image[caps])
    rel, w1, w2, owner = split.triples(caps)
    with torch.no_grad():
        iv, io = model.image_fragments(feats, mask)
        sv, so = model.sentence_fragments(rel, w1, w2, owner)
        total, parts = loop_cost(iv, io, sv, so, len(caps), **cfg.objective_kwargs())
    return [float(x) / len(caps) for x in (total, parts["fragment"], parts["global"])]


def _logged(summary) -> list[float]:
    return [summary["last"][k] for k in ("loss", "fragment", "global")]


def test_streaming_training_reads_shards_through_a_bounded_cache(caches, tmp_path):
    ps, reg, tri, voc = caches
    budget_gb = 3 * 40 * 20 * 32 * 2 / 2**30  # three shards of the four
    budget = int(budget_gb * 2**30)
    store = _store(caches, memory_budget_bytes=budget, stream="shards")
    assert store.streaming
    s = train(TrainConfig(epochs=2, memory_budget_gb=budget_gb, stream="shards", **SMALL), reg, tri, voc, tmp_path,
              store=store)
    feats = store.features
    assert len(feats.cache) <= 3 and feats.loads <= 2 * 8  # shard windows: each shard read about once an epoch
    assert s["best"]["val"]["rsum"] > 150
    # the first batch of a streaming run: the features read through the shard cache are the ones written
    cfg = TrainConfig(epochs=1, max_batches=1, memory_budget_gb=budget_gb, stream="shards", **SMALL)
    one = train(cfg, reg, tri, voc, tmp_path / "one",
                store=_store(caches, memory_budget_bytes=budget, stream="shards"))
    assert _logged(one) == pytest.approx(first_batch_loss(_store(caches), cfg, store), rel=1e-4)


def test_streaming_rows_trains_exactly_as_in_memory(caches, tmp_path):
    """Features read row by row from the shards: the same batches, the same losses and weights, bit for bit, as
    with all features in memory; no shard is held whole."""
    ps, reg, tri, voc = caches
    budget_gb = 40 * 20 * 32 * 2 / 2**30  # one shard of the four
    cfg = dict(epochs=2, **SMALL)
    mem = train(TrainConfig(**cfg), reg, tri, voc, tmp_path / "mem", store=_store(caches))
    store = _store(caches, memory_budget_bytes=int(budget_gb * 2**30), stream="rows")
    rows = train(TrainConfig(memory_budget_gb=budget_gb, stream="rows", **cfg), reg, tri, voc, tmp_path / "rows",
                 store=store)
    feats = store.features
    assert store.streaming and feats.by_rows and not feats.cache and feats.loads > 0
    assert feats.prefetched >= 2 * (rows["last"]["batches"] - 1)  # every batch but each epoch's first read ahead
    assert rows["name"] == mem["name"]  # how features are read is not part of the run
    a, b = (torch.load(tmp_path / d / mem["name"] / "checkpoint-last.pt", weights_only=False) for d in ("mem", "rows"))
    keys = ("loss", "fragment", "global", "val")
    assert [[e[k] for k in keys] for e in a["history"]] == [[e[k] for k in keys] for e in b["history"]]
    assert len(a["history"]) == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("kw", [dict(use_fragment=False), dict(use_global=False, use_mil=False),
                                dict(shared_relation=True), dict(use_mil=False, smooth=1.0, global_margin=10.0),
                                dict(threshold_global=False, fragment_margin=2.0, fragment_scale=3.0,
                                     global_scale=0.1)])
def test_ablations_train_the_objective_they_name(caches, tmp_path, kw):
    ps, reg, tri, voc = caches
    store = _store(caches)
    cfg = TrainConfig(epochs=1, max_batches=1, **{**SMALL, "batch_size": 8, **kw})
    s = train(cfg, reg, tri, voc, tmp_path, store=store)
    want = first_batch_loss(store, cfg)
    assert _logged(s) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert (want[1] == 0) == (kw.get("use_fragment") is False) and (want[2] == 0) == (kw.get("use_global") is False)
    assert s["best"]["val"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_training_matches_cpu_closely(caches, tmp_path):
    ps, reg, tri, voc = caches
    cpu = train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path / "cpu", store=_store(caches))
    gpu_store = _store(caches)
    gpu = train(TrainConfig(epochs=1, **{**SMALL, "device": "cuda"}), reg, tri, voc, tmp_path / "gpu",
                store=gpu_store)
    assert gpu_store.mask.device.type == "cuda"  # the fragments were moved to the GPU once
    assert gpu["last"]["loss"] == pytest.approx(cpu["last"]["loss"], rel=1e-3)
    model, _ = load_model(tmp_path / "gpu" / gpu["name"], "cpu")
    assert next(model.parameters()).device.type == "cpu"
    # a CUDA run resumes (RNG states and optimizer state come back to the right devices)
    more = train(TrainConfig(epochs=2, **{**SMALL, "device": "cuda"}), reg, tri, voc, tmp_path / "gpu",
                 store=gpu_store, run_name_=gpu["name"], resume=True)
    assert more["epochs"] == 2 and more["last"]["loss"] < gpu["last"]["loss"]


def test_training_refuses_a_split_it_cannot_learn_from(tmp_path):
    from model.planted import planted_vocab
    from pipeline.vocab import save_vocab

    ps = synthetic_set(20, feat_dim=8, n_concepts=5, seed=2)
    cfg = TrainConfig(epochs=1, **SMALL)
    # captions of one word: no dependency triple at all
    no_triples = synthetic_set(20, feat_dim=8, n_concepts=5, triples_per_caption=0, seed=2)
    reg, tri, voc = write_caches(tmp_path / "a", no_triples)
    with pytest.raises(ValueError, match=r"no sentence fragments .*all 80 training captions have zero"):
        train(cfg, reg, tri, voc, tmp_path / "runs", splits=no_triples.splits)
    # every word rarer than min-count: a vocabulary of <unk> alone
    reg, tri, voc = write_caches(tmp_path / "b", ps)
    only_unk = save_vocab(planted_vocab(ps, min_count=10**6), tmp_path / "b" / "unk.json")
    with pytest.raises(ValueError, match=r"vocabulary .* holds only <unk>.*--min-count"):
        train(cfg, reg, tri, only_unk, tmp_path / "runs", splits=ps.splits)
    # every image without a fragment (an empty mask)
    ps.mask[:] = False
    reg, tri, voc = write_caches(tmp_path / "c", ps)
    with pytest.raises(ValueError, match=r"no image fragments"):
        train(cfg, reg, tri, voc, tmp_path / "runs", splits=ps.splits)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_each_epoch_draws_its_own_batches(caches, tmp_path):
    ps, reg, tri, voc = caches
    store = _store(caches)
    cfg = TrainConfig(epochs=1, max_batches=1, **{**SMALL, "batch_size": 8})
    one = train(cfg, reg, tri, voc, tmp_path, store=store)
    model, _ = load_model(tmp_path / one["name"], which="last")  # after epoch 1's one step
    two = train(TrainConfig(epochs=2, max_batches=1, **{**SMALL, "batch_size": 8}), reg, tri, voc, tmp_path,
                store=store, resume=True)
    assert two["name"] == one["name"]
    want = first_batch_loss(store, cfg, model=model, epoch=1)
    assert _logged(two) == pytest.approx(want, rel=1e-4)
    assert want != pytest.approx(first_batch_loss(store, cfg, model=model, epoch=0), rel=1e-4)  # another batch


def test_validation_scores_do_not_depend_on_its_chunks(caches):
    store = _store(caches)
    cfg = TrainConfig(**SMALL)
    torch.manual_seed(1)
    model = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d)
    val = store.split("val")
    whole = validate(model, val, cfg, torch.device("cpu"), captions_per_chunk=val.n_captions, block_bytes=2**30)
    small = validate(model, val, cfg, torch.device("cpu"), captions_per_chunk=7, block_bytes=4096)
    assert small == whole and whole["rsum"] > 0


def test_features_load_the_gpu_way_equal_the_direct_read(caches):
    """The shard-by-shard host-buffer path (how features go straight onto a GPU) gives the direct read's tensor."""
    from model.store import _load_features, _read_regions

    store = _store(caches)
    reg = _read_regions(store.region_folder)
    n, dim = len(reg["ids"]), reg["dim"]
    direct = _load_features(reg["shards"], n, 20, dim, "cpu")
    buffered = _load_features(reg["shards"], n, 20, dim, "cpu", through_host_buffer=True)
    assert len(reg["shards"]) > 1 and torch.equal(direct, buffered) and torch.equal(direct, store.features.feats)
    assert direct.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_loads_features_onto_the_gpu(caches):
    cpu, gpu = _store(caches), _store(caches, device="cuda")
    assert gpu.features.feats.is_cuda and torch.equal(gpu.features.feats.cpu(), cpu.features.feats)


def test_two_trainers_never_share_a_run_folder(caches, tmp_path):
    # another process training the same run (a second command started meanwhile) holds the folder's lock: a
    # trainer started now stops at once with the way out, before writing anything, and the run is then free
    import subprocess
    import sys
    import textwrap

    from model.train import RunBusy

    ps, reg, tri, voc = caches
    store = _store(caches)
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from model.train import hold_run_lock
        lock = hold_run_lock(Path({str(folder)!r}))
        print("held", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=rf"run {folder} is being trained right now \(by pid {holder.pid}\)"):
            train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path, store=store, run_name_="busy")
        assert sorted(p.name for p in folder.iterdir()) == [".train.lock"]  # nothing written
    finally:
        holder.communicate("\n", timeout=60)
    s = train(TrainConfig(epochs=1, **SMALL), reg, tri, voc, tmp_path, store=store, run_name_="busy")
    assert s["epochs"] == 1 and (folder / LAST).is_file()
