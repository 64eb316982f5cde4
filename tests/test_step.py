"""The trainer's fixed-layout step against the flat step it replaced: same losses, same parameters, any shapes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model.batches import epoch_batches
from model.defrag import DeFrag
from model.planted import synthetic_set, write_caches
from model.step import flat_step, padded_loss, padded_step, plan_epoch
from model.store import FragmentStore
from model.train import TrainConfig, _compiled, train

OBJ = TrainConfig().objective_kwargs()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A planted set whose captions hold 0 to 7 triples (some none at all), with 8 of 20 image rows real."""
    root = tmp_path_factory.mktemp("step")
    ps = synthetic_set(120, feat_dim=24, n_concepts=20, val_fraction=0.2, seed=5)
    rng = random.Random(0)
    ps.triples = [[] if i % 17 == 3 else (t * 3)[:rng.randint(1, 7)] for i, t in enumerate(ps.triples)]
    reg, tri, voc = write_caches(root, ps, image_shard=25, caption_shard=150)
    st = FragmentStore(reg, tri, voc, ps.splits)
    lens = st.offsets[1:] - st.offsets[:-1]
    assert (lens == 0).any() and lens.max() >= 6 and not st.mask.all()  # the cases the layout must handle
    return st


def _model(st: FragmentStore, seed: int = 0, **kw) -> DeFrag:
    torch.manual_seed(seed)
    return DeFrag(st.feat_dim, st.n_words, st.n_relations, h=16, d=8, **kw)


def _run(st, batches, step, fused: bool, objective=OBJ, **model_kw) -> tuple[list[float], dict]:
    model = _model(st, **model_kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, fused=fused)
    losses = []
    for caps in batches:
        loss, frag, glob = step(model, caps, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append([float(loss.detach()), float(frag), float(glob)])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", [OBJ, {**OBJ, "use_mil": False, "global_margin": 0.5},
                                       {**OBJ, "use_global": False}, {**OBJ, "use_fragment": False}],
                         ids=["default", "no-mil-small-margin", "fragment-only", "global-only"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-relation", "shared-relation"])
def test_padded_steps_follow_the_flat_step(store, objective, shared):
    split = store.split("train")
    cpu = torch.device("cpu")
    every = epoch_batches(split.caption_image, 14, torch.Generator().manual_seed(2))
    batches = every[:8] + sorted(every, key=len)[:2]  # the short last batches of rounds too
    assert len({len(b) for b in batches}) > 1
    plan = plan_epoch(split, batches, store.n_relations, cpu)
    ref, ref_params = _run(store, batches, lambda m, c, o: flat_step(m, split, c, cpu, o), False, objective,
                           shared_relation=shared)
    runs = {
        "own sizes": lambda m, c, o: padded_step(m, split, c, cpu, o),
        "fixed sizes": lambda m, c, o: padded_step(m, split, c, cpu, o, plan.max_triples, plan.max_group),
    }
    for name, step in runs.items():
        got, params = _run(store, plan.batches, step, True, objective, shared_relation=shared)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6, msg=name)
        for k in ref_params:
            torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
    assert ref[-1][0] != ref[0][0]  # the parameters moved: later steps compare trained models


def test_plan_sizes_cover_every_batch(store):
    split = store.split("train")
    batches = epoch_batches(split.caption_image, 14, torch.Generator().manual_seed(4))
    plan = plan_epoch(split, batches, store.n_relations, torch.device("cpu"))
    most_t = most_g = 0
    for caps in batches:
        rel, _, _, _ = split.triples(caps)
        most_t = max(most_t, len(rel))
        most_g = max(most_g, int(torch.bincount(rel, minlength=store.n_relations).max()) if len(rel) else 0)
    assert most_t <= plan.max_triples < most_t + 64 and most_g <= plan.max_group < most_g + 16
    assert [b.tolist() for b in plan.batches] == [b.tolist() for b in batches]


def test_padded_triples_are_the_triples_then_padding(store):
    split = store.split("train")
    caps = torch.tensor([3, 0, 20, 7, 11])
    want = split.triples(caps)
    for length in (None, len(want[0]) + 9):
        got = split.padded_triples(caps, length)
        n = len(want[0])
        assert len(got[0]) == (length or n)
        for g, w in zip(got, want):
            assert torch.equal(g[:n], w)
        assert (got[3][n:] == len(caps)).all()
    empty = [c for c in range(split.n_captions) if len(split.triples(torch.tensor([c]))[0]) == 0][:2]
    rel, _, _, owner = split.padded_triples(torch.tensor(empty), 5)  # only captions without triples
    assert (owner == len(empty)).all() and len(rel) == 5


def test_training_trajectory_equals_the_flat_step(store, tmp_path):
    """train() (fixed layout, fused SGD) against today's loop: flat step, the plain SGD, the same batches."""
    cfg = TrainConfig(epochs=2, h=16, d=8, batch_size=16, lr=0.05, weight_decay=1e-3, progress=False, device="cpu")
    s = train(cfg, None, None, None, tmp_path, store=store)
    split, cpu = store.split("train"), torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    logged = [json.loads(x) for x in (tmp_path / s["name"] / "log.jsonl").read_text().splitlines()]
    for epoch in range(2):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        losses = []
        for caps in epoch_batches(split.caption_image, cfg.batch_size, gen):
            loss, _, _ = flat_step(model, split, caps, cpu, cfg.objective_kwargs())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        rec = [r for r in logged if r["kind"] == "epoch"][epoch]
        assert rec["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_training_with_the_gpus_fixed_shapes_equals_training_without(store, tmp_path, monkeypatch):
    """train() the GPU's way (an epoch plan's fixed sizes, kept across epochs) on the CPU: the same epoch losses."""
    import model.train as mt

    # batches of 16, one per epoch: their plans need 64, 128, 64, 64 triples, so the sizes must grow and stay
    cfg = TrainConfig(epochs=4, h=16, d=8, batch_size=16, max_batches=1, lr=0.01, grad_clip=5.0, progress=False,
                      device="cpu")
    plain = train(cfg, None, None, None, tmp_path / "plain", store=store)
    monkeypatch.setattr(mt, "FIXED_SHAPE_DEVICES", {"cpu", "cuda"})
    seen = []
    step = mt.padded_step
    monkeypatch.setattr(mt, "padded_step", lambda *a, **k: seen.append(a[5:7]) or step(*a, **k))
    fixed = train(cfg, None, None, None, tmp_path / "fixed", store=store)
    assert [t for t, _ in seen] == [64, 128, 128, 128] and all(g % 16 == 0 for _, g in seen)
    assert [t for t, _ in seen] == sorted(t for t, _ in seen)  # sizes never shrink from one epoch to the next

    def losses(s):
        return [json.loads(x)["loss"] for x in (tmp_path / s / plain["name"] / "log.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "epoch"]

    assert fixed["name"] == plain["name"]
    assert losses("fixed") == pytest.approx(losses("plain"), rel=1e-5)


@pytest.mark.slow
def test_compiled_step_equals_eager(store):
    """torch.compile of the step (the CUDA-graph path on a GPU) on the CPU: one graph, the same losses."""
    split, cpu = store.split("train"), torch.device("cpu")
    batches = [b for b in epoch_batches(split.caption_image, 14, torch.Generator().manual_seed(3)) if len(b) == 14][:4]
    plan = plan_epoch(split, batches, store.n_relations, cpu)
    assert len({len(split.triples(b)[0]) for b in batches}) > 1  # batches of different triple counts, one shape
    explain = torch._dynamo.explain(padded_loss)
    caps = plan.batches[0]
    feats, mask = split.images(split.caption_image[caps])
    ex = explain(_model(store), feats, mask, *split.padded_triples(caps, plan.max_triples), OBJ, plan.max_group)
    assert ex.graph_break_count == 0  # nothing in the step leaves the graph (no host sync, no Python fallback)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _compiled(padded_loss, cpu)
    fixed = (plan.max_triples, plan.max_group)
    eager, _ = _run(store, plan.batches, lambda m, c, o: padded_step(m, split, c, cpu, o, *fixed), True)
    got, _ = _run(store, plan.batches, lambda m, c, o: padded_step(m, split, c, cpu, o, *fixed, loss_fn=compiled),
                  True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once for all four batches


def test_compile_asks_for_fixed_shapes_everywhere(store, tmp_path, monkeypatch):
    """--compile on the CPU: the step gets the plan's fixed sizes (each batch its own shape would be one compile per
    batch). ``_compiled`` is replaced by a recorder here; the compiled step itself is tested above."""
    import model.train as mt

    asked, seen = [], []
    monkeypatch.setattr(mt, "_compiled", lambda fn, device: asked.append(device.type) or fn)
    step = mt.padded_step
    monkeypatch.setattr(mt, "padded_step", lambda *a, **k: seen.append(a[5:7]) or step(*a, **k))
    cfg = TrainConfig(epochs=1, h=16, d=8, batch_size=14, max_batches=6, progress=False, device="cpu", compile=True)
    train(cfg, None, None, None, tmp_path, store=store)
    assert asked == ["cpu"] and len(seen) == 6 and len(set(seen)) == 1 and None not in seen[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_fixed_step_follows_the_cpu_flat_step(store, compile_):
    split, cpu, gpu = store.split("train"), torch.device("cpu"), torch.device("cuda")
    batches = epoch_batches(split.caption_image, 14, torch.Generator().manual_seed(2))[:6]
    ref, _ = _run(store, batches, lambda m, c, o: flat_step(m, split, c, cpu, o), False)
    store.to(gpu)
    try:
        plan = plan_epoch(split, batches, store.n_relations, gpu)
        fn = _compiled(padded_loss, gpu) if compile_ else padded_loss
        fixed = (plan.max_triples, plan.max_group)

        def step(m, c, o):
            return padded_step(m.to(gpu), split, c, gpu, o, *fixed, loss_fn=fn)

        model = _model(store).to(gpu)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, fused=True)
        got = []
        for caps in plan.batches:
            loss, frag, glob = step(model, caps, OBJ)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            got.append([float(loss.detach()), float(frag), float(glob)])
    finally:
        store.to(cpu)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-3, atol=1e-4)


def test_a_compiler_that_cannot_run_names_the_way_out(tmp_path):
    """No working C++ compiler (inductor's CPU backend needs one): one line naming --compile and the fix."""
    import subprocess
    import sys

    code = ("import torch\nfrom model.train import _compiled\n"
            "_compiled(lambda x: (x * 2 + 1).sin(), torch.device('cpu'))(torch.ones(5))\n")
    env = {**__import__("os").environ, "CXX": str(tmp_path / "no-such-g++"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "--compile failed on cpu" in r.stderr and "train without --compile" in r.stderr, r.stderr[-2000:]
