"""One training epoch on a Flickr30K-sized synthetic cache: seconds per epoch, peak RSS, share of time in matmuls.

    OMP_NUM_THREADS=2 python benchmarks/bench_epoch.py --threads 2             # CPU
    python benchmarks/bench_epoch.py --device cuda                             # one GPU

The script writes the cache once (29,000 training + 1,000 validation images x 20 x 1024 float16 through
pipeline.cache's writers; 5 captions per image of about 10 triples; a 10,000-word Zipf vocabulary) into
--cache-dir, in a child process so the peak RSS printed is the trainer's own. Then it builds the fragment store,
trains one epoch with the paper's sizes (h 1000, d 200, batch 100) through model.train.train, and profiles a few
training steps to split the time between matrix products and everything else.
Targets: <= 10 min per epoch on 2 CPU cores; peak RSS <= 1.5x the cached feature bytes; <= 5 s per epoch on an H100.
The profile times the step before the fixed layout ("flat") beside the trainer's ("padded", and "compiled" on a GPU
or with --compile) on the same batches, so the ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_cache(root: Path, n_train: int, n_val: int, dim: int, caps: int, triples: float, n_words: int,
                n_rels: int, shard: int, seed: int = 0) -> None:
    from pipeline.cache import K_FRAGMENTS, shard_ranges, write_region_shard, write_triple_shard
    from pipeline.vocab import build_vocab, save_vocab

    rng = np.random.default_rng(seed)
    n = n_train + n_val
    ids = [f"im{i:06d}" for i in range(n)]
    producer, dataset = {"backend": "bench", "dim": dim}, {"name": "bench30k"}
    reg, tri = root / "regions" / "bench30k", root / "triples" / "bench30k"
    ranges = shard_ranges(n, shard)
    for s, (a, b) in enumerate(ranges):
        m = b - a
        mask = np.zeros((m, K_FRAGMENTS), bool)
        mask[:, :1] = True
        mask[:, 1:] = rng.random((m, K_FRAGMENTS - 1)) < 0.9  # a few images with fewer than 19 detections
        mask[:, 1:] = np.sort(mask[:, 1:], axis=1)[:, ::-1]
        feats = (rng.standard_normal((m, K_FRAGMENTS, dim), np.float32) * mask[..., None]).astype(np.float16)
        write_region_shard(reg / f"shard-{s:05d}.h5", image_ids=ids[a:b], image_hw=np.full((m, 2), 375),
                           boxes=np.zeros((m, K_FRAGMENTS, 4)), scores=mask.astype(np.float32),
                           labels=np.where(mask, 1, -1), mask=mask, features=feats, producer=producer,
                           dataset=dataset, shard_index=s, num_shards=len(ranges))
    words = np.array([f"w{i}" for i in range(n_words)], dtype=object)
    rels = np.array([f"rel{i}" for i in range(n_rels)], dtype=object)
    zipf_w = 1.0 / np.arange(1, n_words + 1)
    zipf_r = 1.0 / np.arange(1, n_rels + 1)
    cap_img = np.repeat(np.arange(n), caps)
    lens = np.maximum(1, rng.poisson(triples, len(cap_img)))
    total = int(lens.sum())
    r = rng.choice(n_rels, total, p=zipf_r / zipf_r.sum())
    h = rng.choice(n_words, total, p=zipf_w / zipf_w.sum())
    d = rng.choice(n_words, total, p=zipf_w / zipf_w.sum())
    offsets = np.concatenate([[0], np.cumsum(lens)])
    cranges = shard_ranges(len(cap_img), 5000)
    for s, (a, b) in enumerate(cranges):
        ts = []
        for m in range(a, b):
            lo, hi = offsets[m], offsets[m + 1]
            ts.append([(rels[r[t]], words[h[t]], words[d[t]], words[h[t]], words[d[t]], 1, 2)
                       for t in range(lo, hi)])
        write_triple_shard(tri / f"shard-{s:05d}.h5", caption_ids=[f"{ids[i]}#{m % caps}" for m, i in
                                                                     zip(range(a, b), cap_img[a:b])],
                           image_ids=[ids[i] for i in cap_img[a:b]], texts=[""] * (b - a), triples=ts,
                           producer={"parser": "bench"}, dataset=dataset, shard_index=s, num_shards=len(cranges))
    train_t = offsets[n_train * caps]
    wc = np.bincount(np.concatenate([h[:train_t], d[:train_t]]), minlength=n_words)
    rc = np.bincount(r[:train_t], minlength=n_rels)
    vocab = build_vocab(Counter({str(words[i]): int(c) for i, c in enumerate(wc) if c}),
                        Counter({str(rels[i]): int(c) for i, c in enumerate(rc) if c}), min_count=5)
    save_vocab(vocab, root / "vocab.json")
    (root / "splits.json").write_text(json.dumps({i: ("train" if k < n_train else "val") for k, i in enumerate(ids)}))
    (root / "done").write_text("ok\n")


class RssTimeline:
    """This process's resident memory sampled every ``every`` seconds in a thread; ``phase(name)`` labels what
    runs from now on, and ``peaks`` keeps each phase's highest RSS (bytes); ``anon_peaks`` the same for the
    anonymous part (RSS less file-backed pages: what the process allocated, without the pages of torch's shared
    libraries that its kernels fault in as they are first used)."""

    def __init__(self, every: float = 0.005):
        import os
        import threading

        self._page, self._every, self.current, self.peaks = os.sysconf("SC_PAGE_SIZE"), every, "imports (torch)", {}
        self.anon_peaks: dict[str, int] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds when each phase began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> tuple[int, int]:
        """(resident, resident less file-backed and shared) in bytes, from /proc/self/statm."""
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return int(fields[1]) * self._page, (int(fields[1]) - int(fields[2])) * self._page

    def _note(self) -> None:
        r, anon = self.rss()
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), r)
        self.anon_peaks[self.current] = max(self.anon_peaks.get(self.current, 0), anon)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._note()

    def phase(self, name: str) -> None:
        self._note()
        self.cpu[name] = time.process_time()
        self.current = name
        self._note()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._note()


def watch_training_phases(timeline: RssTimeline) -> None:
    """Label the trainer's phases for the memory breakdown: steps begin when the epoch's batches are drawn,
    validation and the checkpoint follow (wraps model.train's module functions; the benchmark only)."""
    import model.train as mt

    draw, validate = mt.epoch_batches, mt.validate

    def batches(*a, **k):
        out = draw(*a, **k)
        timeline.phase("training steps")
        return out

    def validation(*a, **k):
        timeline.phase("validation")
        out = validate(*a, **k)
        timeline.phase("checkpoint + log")
        return out

    mt.epoch_batches, mt.validate = batches, validation


def profile_steps(store, cfg, device, steps: int, step_kind: str) -> dict:
    """Time a few training steps under torch.profiler: ms per step and the share of device (or CPU) time in
    matrix products. ``step_kind``: "flat" (the step before the fixed layout: real fragments only, autograd through
    the cost, plain SGD), "padded" (the trainer's step: fixed layout, closed-form cost gradient, fused SGD; fixed
    shapes on a GPU) or "compiled" (that step under torch.compile: CUDA graphs on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.batches import epoch_batches
    from model.defrag import DeFrag
    from model.step import flat_step, padded_loss, padded_step, plan_epoch
    from model.train import _compiled

    torch.manual_seed(0)
    model = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=step_kind != "flat")
    split = store.split("train")
    warm = 8 if step_kind == "compiled" else 3
    batches = epoch_batches(split.caption_image, cfg.batch_size, torch.Generator().manual_seed(1))
    batches = [b for b in batches if len(b) == cfg.batch_size][:steps + warm]
    plan = plan_epoch(split, batches, store.n_relations, store.device)
    fixed = (plan.max_triples, plan.max_group) if device.type == "cuda" else (None, None)
    loss_fn = _compiled(padded_loss, device) if step_kind == "compiled" else padded_loss
    obj = cfg.objective_kwargs()

    def step(caps):
        if step_kind == "flat":
            loss, _, _ = flat_step(model, split, caps, device, obj)
        else:
            loss, _, _ = padded_step(model, split, caps, device, obj, *fixed, loss_fn=loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for caps in plan.batches[:warm]:  # warm-up (and the compile)
        step(caps)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for caps in plan.batches[warm:]:
            step(caps)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    n = len(plan.batches) - warm
    # without the profiler (it adds a cost per kernel launch that would favour the step with fewer launches)
    t = time.perf_counter()
    for caps in plan.batches[warm:]:
        step(caps)
    if cuda:
        torch.cuda.synchronize()
    plain = time.perf_counter() - t
    mm_names = ("mm", "addmm", "bmm", "matmul", "baddbmm", "linear")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ev = prof.key_averages()

    def t_of(e):  # older torch names the device column after CUDA
        return getattr(e, key, None) if getattr(e, key, None) is not None else getattr(e, "self_cuda_time_total", 0)

    mm = sum(t_of(e) for e in ev if e.key.split("::")[-1] in mm_names) / 1e6
    # GPU busy: the kernels' and copies' own entries (their device type is CUDA); CPU: every op's self time
    busy = sum(t_of(e) for e in ev if not cuda or getattr(getattr(e, "device_type", None), "name", "") == "CUDA")
    busy = (busy or sum(t_of(e) for e in ev)) / 1e6
    return {"steps": n, "wall_s": wall, "matmul_s": mm, "busy_s": busy, "ms_per_step": 1e3 * plain / n,
            "ms_per_step_profiled": 1e3 * wall / n, "warmup_s": warm_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "defrag-bench-epoch"))
    ap.add_argument("--images", type=int, default=29000)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--captions", type=int, default=5, help="captions per image")
    ap.add_argument("--triples", type=float, default=10.0, help="mean triples per caption")
    ap.add_argument("--words", type=int, default=10000)
    ap.add_argument("--relations", type=int, default=40)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--memory-budget-gb", type=float, default=8.0)
    ap.add_argument("--stream", default="auto", choices=["auto", "rows", "shards"],
                    help="features over the budget: each batch's rows, or windows of whole shards")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--max-batches", type=int, default=0,
                    help="time only this many batches of the epoch and extrapolate (0: the whole epoch)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    ap.add_argument("--compile", action="store_true", help="train the epoch with torch.compile (CUDA graphs on a GPU); "
                    "the profile adds a compiled row (always on a GPU)")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    root = Path(a.cache_dir)
    if a.write_only:
        write_cache(root, a.images, a.val_images, a.dim, a.captions, a.triples, a.words, a.relations, a.shard_size)
        return
    if not (root / "done").exists():
        t = time.time()
        subprocess.run([sys.executable, __file__, "--write-only", "--cache-dir", str(root), "--images",
                        str(a.images), "--val-images", str(a.val_images), "--dim", str(a.dim), "--captions",
                        str(a.captions), "--triples", str(a.triples), "--words", str(a.words), "--relations",
                        str(a.relations), "--shard-size", str(a.shard_size)], check=True)
        print(f"wrote the synthetic cache to {root} in {time.time() - t:.0f} s")

    timeline = RssTimeline()
    import torch

    from model.store import FragmentStore
    from model.train import TrainConfig, train
    from pipeline.devices import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    timeline.phase("fragment store")
    t = time.time()
    store = FragmentStore(root / "regions" / "bench30k", root / "triples" / "bench30k", root / "vocab.json",
                          json.loads((root / "splits.json").read_text()),
                          memory_budget_bytes=int(a.memory_budget_gb * 2**30), device=resolve_device(a.device),
                          stream=a.stream)
    load_s = time.time() - t
    d = store.describe()
    print(f"store: {d['train_images']} train / {d['val_images']} val images, {d['captions']} captions, "
          f"{d['triples']} triples, {store.n_words} words; features {store.feature_bytes / 1e9:.2f} GB "
          f"({'streaming ' + ('rows' if store.features.by_rows else 'shards') if store.streaming else 'in memory'}); "
          f"loaded in {load_s:.1f} s")
    cfg = TrainConfig(epochs=1, device=a.device, memory_budget_gb=a.memory_budget_gb, max_batches=a.max_batches,
                      progress=not a.no_progress, compile=a.compile, stream=a.stream)
    timeline.phase("training setup")
    watch_training_phases(timeline)
    with tempfile.TemporaryDirectory() as runs:
        s = train(cfg, None, None, root / "vocab.json", runs, store=store)
    timeline.stop()
    rec = s["last"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = torch.device(s["device"])
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    full = -(-store.split("train").n_captions // cfg.batch_size)
    per = rec["train_seconds"] / rec["batches"]
    part = "" if rec["batches"] == full else f" (timed {rec['batches']} of {full} batches; epoch extrapolated)"
    print(f"epoch: {full} batches of {cfg.batch_size} pairs, train {per * full:.1f} s ({1e3 * per:.1f} ms/batch)"
          f"{part}, validation {rec['val_seconds']:.1f} s, loss {rec['loss']:.1f}")
    steps_cpu = timeline.cpu["validation"] - timeline.cpu["training steps"]
    print(f"training steps used {1e3 * steps_cpu / rec['batches']:.0f} ms of process CPU time per batch (all threads; "
          f"on a machine shared with other work this is steadier than wall time)")
    print(f"peak RSS {rss / 1e9:.2f} GB = {rss / store.feature_bytes:.2f}x the cached feature bytes (target <= 1.5x)")
    fb, prev = store.feature_bytes, 0
    print(f"  where the peak goes (RSS sampled every 5 ms; x = multiples of the {fb / 1e9:.2f} GB of features):")
    for name, peak in timeline.peaks.items():
        anon = timeline.anon_peaks[name]
        print(f"  {name:<18} peak {peak / 1e9:6.2f} GB ({peak / fb:4.2f}x), {(peak - prev) / 1e6:+8.0f} MB over the "
              f"phase before; anonymous {anon / 1e9:5.2f} GB ({anon / fb:4.2f}x)")
        prev = peak
    anon = max(timeline.anon_peaks.values())
    print(f"peak anonymous RSS (RSS less torch's and the other libraries' file-backed pages) {anon / 1e9:.2f} GB = "
          f"{anon / fb:.2f}x the cached feature bytes")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 1e9:.2f} GB")
    if a.profile_steps:
        kinds = ["flat", "padded"] + (["compiled"] if dev.type == "cuda" or a.compile else [])
        what = {"flat": "before (flat step, autograd cost, plain SGD)", "padded": "after (fixed layout, closed-form "
                "gradient, fused SGD)", "compiled": "after, torch.compile" + (" (CUDA graphs)" if dev.type == "cuda"
                                                                              else "")}
        rows = {k: profile_steps(store, cfg, dev, a.profile_steps, k) for k in kinds}
        where = "GPU" if dev.type == "cuda" else "CPU"
        for k, p in rows.items():
            share = (f"GPU busy {p['busy_s'] / p['wall_s']:.0%} of the profiled wall time" if dev.type == "cuda" else
                     f"matmuls {p['matmul_s'] / p['wall_s']:.0%} of the profiled wall time")
            print(f"step {what[k]}: {p['ms_per_step']:.1f} ms/step over {p['steps']} steps ({p['ms_per_step_profiled']:.1f} "
                  f"under the profiler; {where} busy {p['busy_s']:.3f} s, matmuls {p['matmul_s']:.3f} s; {share}; "
                  f"warm-up {p['warmup_s']:.1f} s)")
        base = rows["flat"]["ms_per_step"]
        print("  ratios to the step before: " + ", ".join(f"{k} {p['ms_per_step'] / base:.2f}x" for k, p in rows.items()))


if __name__ == "__main__":
    main()
