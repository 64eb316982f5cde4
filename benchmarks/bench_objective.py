"""Objective forward + backward: the vectorised ``defrag_cost`` against the loop version of the tests.

    OMP_NUM_THREADS=1 python benchmarks/bench_objective.py            # 100 pairs, 20 + ~10 fragments each
    python benchmarks/bench_objective.py --device cuda                 # vectorised side on a GPU as well

Both sides see the same batch (float32, h = 1000); the ratio is printed, measured side by side in one run.
The loop version builds autograd nodes per fragment pair (about 30 min for the full batch on one core), so by
default it is timed on the first --loop-pairs 20 pairs' worth of a batch and scaled by the number of fragment
pairs (its cost is linear in them); --loop-pairs 0 times it on the full batch.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from objective_reference import loop_cost  # noqa: E402

from model.objective import defrag_cost, padded_cost  # noqa: E402


def fixed_layout(iv, io, sv, so, pairs):
    """The same batch in the trainer's fixed layout (every image has the same number of fragments here)."""
    k = iv.shape[0] // pairs
    mask = torch.ones(pairs, k, dtype=torch.bool, device=iv.device)
    return padded_cost(iv.view(pairs, k, iv.shape[1]), mask, sv, so)


def batch(pairs: int, h: int, img_frags: int, sent_frags: float, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    n_sent = torch.poisson(torch.full((pairs,), float(sent_frags)), generator=g).long().clamp(min=1)
    io = torch.arange(pairs).repeat_interleave(img_frags)
    so = torch.arange(pairs).repeat_interleave(n_sent)
    iv = torch.randn(len(io), h, generator=g) * h ** -0.5
    sv = torch.randn(len(so), h, generator=g) * h ** -0.5
    return (iv.to(device).requires_grad_(), io.to(device), sv.to(device).requires_grad_(), so.to(device), pairs)


def time_fn(fn, args, repeat: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        total, _ = fn(*args)
        total.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--h", type=int, default=1000)
    ap.add_argument("--img-frags", type=int, default=20)
    ap.add_argument("--sent-frags", type=float, default=10.0)
    ap.add_argument("--loop-pairs", type=int, default=20,
                    help="time the loop on this many pairs and scale by fragment pairs (0: the full batch, ~30 min)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    args = batch(a.pairs, a.h, a.img_frags, a.sent_frags, 0)
    ni, ns = args[0].shape[0], args[2].shape[0]
    print(f"batch: {a.pairs} pairs, {ni} image fragments, {ns} sentence fragments, h = {a.h}, "
          f"torch threads {torch.get_num_threads()}")
    vec = time_fn(defrag_cost, args, a.repeat, "cpu")
    print(f"vectorised forward+backward (cpu):  {vec * 1e3:9.2f} ms")
    fixed = time_fn(fixed_layout, args, a.repeat, "cpu")
    print(f"fixed layout, closed-form gradient (cpu): {fixed * 1e3:9.2f} ms = {fixed / vec:.2f}x the flat cost "
          "(the trainer's form: model/objective.py padded_cost)")
    if a.device != "cpu":
        gargs = batch(a.pairs, a.h, a.img_frags, a.sent_frags, 0, a.device)
        for name, fn in (("vectorised forward+backward", defrag_cost), ("fixed layout", fixed_layout)):
            time_fn(fn, gargs, 3, a.device)  # warm-up
            gpu = time_fn(fn, gargs, a.repeat, a.device)
            print(f"{name} ({a.device}): {gpu * 1e3:9.3f} ms")

    lp = a.loop_pairs or a.pairs
    largs = args if lp == a.pairs else batch(lp, a.h, a.img_frags, a.sent_frags, 0)
    t = time.perf_counter()
    total, _ = loop_cost(*largs)
    total.backward()
    loop = time.perf_counter() - t
    frag_pairs = largs[0].shape[0] * largs[2].shape[0]
    scale = (ni * ns) / frag_pairs
    print(f"loop forward+backward ({lp} pairs, {frag_pairs} fragment pairs): {loop:9.2f} s"
          + (f" -> {loop * scale:.1f} s scaled to the full batch (x{scale:.1f} fragment pairs)" if scale != 1 else ""))
    print(f"ratio loop / vectorised on cpu: {loop * scale / vec:,.0f}x  (target >= 100x)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
