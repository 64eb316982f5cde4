"""How long scoring a test split takes: 1,000 images x 5,000 captions (the Flickr protocol) by default.

    python benchmarks/bench_scoring.py                       # h = 1000, this machine's CPU
    python benchmarks/bench_scoring.py --h 100 1000 --device cuda

Random fragment vectors: 20 per image (the paper's 19 regions + the whole image) and on average 10 per caption.
Side by side in one run, for each h:
  floor     the fragment dots alone, chunked like the scorer (img_vecs @ sent_vecs.T): the arithmetic S_kl needs
  scores    model.evaluate.score_matrix over the objective's pair_scores (dots + ReLU + segment sums)
  metrics   model.evaluate.retrieval_metrics on the (1000, 5000) result
and the ratio scores / floor (how much the ReLU and segment sums cost over the bare matmul). Beside them, the
machine's own float32 matmul rate (square n x n products, best of a few; --rate-n) and the fraction of it that
scoring reaches (the fragment dots' 2 Fi Fs h multiply-adds over the scoring time; target >= 50%).
"""
from __future__ import annotations

import argparse
import time

import torch

from model.evaluate import retrieval_metrics, score_matrix


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_rate(device: str, n: int, repeat: int = 3) -> float:
    """FLOP/s of one float32 (n, n) @ (n, n) product on this device, best of ``repeat`` after a warm-up."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t, _ = timed(lambda: a @ b, device, repeat + 1)
    return 2.0 * n ** 3 / t


def fake_split(n_images: int, n_captions: int, img_frags: int, sent_frags: float, h: int, device: str,
               seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img_owner = torch.arange(n_images).repeat_interleave(img_frags)  # (Fi,)
    per_caption = torch.randint(max(1, int(sent_frags) - 5), int(sent_frags) + 6, (n_captions,), generator=g)
    sent_owner = torch.arange(n_captions).repeat_interleave(per_caption)  # (Fs,)
    img_vecs = torch.randn(len(img_owner), h, generator=g) / h ** 0.5  # (Fi, h)
    sent_vecs = torch.randn(len(sent_owner), h, generator=g).relu()  # (Fs, h) nonnegative like ReLU outputs
    caption_image = torch.arange(n_captions) % n_images
    return (img_vecs.to(device), img_owner.to(device), sent_vecs.to(device), sent_owner.to(device),
            caption_image)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--img-frags", type=int, default=20)
    p.add_argument("--sent-frags", type=float, default=10.0, help="mean triples per caption")
    p.add_argument("--h", type=int, nargs="+", default=[1000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--budget-mb", type=int, default=256, help="memory of one chunk's fragment dot block")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--rate-n", type=int, default=0, help="size of the square matmul that measures the machine's "
                   "rate (0: 2048 on the CPU, 8192 on a GPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); {args.images} images x {args.img_frags} fragments, "
          f"{args.captions} captions x ~{args.sent_frags:g} fragments; chunk budget {args.budget_mb} MiB")
    rate_n = args.rate_n or (8192 if device.startswith("cuda") else 2048)
    rate = matmul_rate(device, rate_n)
    print(f"machine matmul rate: {rate / 1e12:.3f} TFLOP/s (float32, {rate_n} x {rate_n} squared)")
    print(f"{'h':>6} {'floor s':>9} {'scores s':>9} {'metrics s':>10} {'scores/floor':>13} {'TFLOP/s':>8} "
          f"{'of matmul':>10}")
    for h in args.h:
        img_vecs, img_owner, sent_vecs, sent_owner, caption_image = fake_split(
            args.images, args.captions, args.img_frags, args.sent_frags, h, device)
        budget = args.budget_mb * 2**20
        n_i, n_s = args.images, args.captions

        def floor():
            step = max(1, budget // (4 * sent_vecs.shape[0]))
            for a in range(0, img_vecs.shape[0], step):
                img_vecs[a:a + step] @ sent_vecs.T

        t_floor, _ = timed(floor, device, args.repeat)
        t_scores, scores = timed(lambda: score_matrix(img_vecs, img_owner, n_i, sent_vecs, sent_owner, n_s,
                                                      budget_bytes=budget), device, args.repeat)
        t_metrics, m = timed(lambda: retrieval_metrics(scores, caption_image), "cpu", args.repeat)
        flops = 2.0 * img_vecs.shape[0] * sent_vecs.shape[0] * h
        print(f"{h:>6} {t_floor:>9.2f} {t_scores:>9.2f} {t_metrics:>10.3f} {t_scores / t_floor:>13.2f} "
              f"{flops / t_scores / 1e12:>8.3f} {flops / t_scores / rate:>10.0%}")
        assert m["n_images"] == n_i and m["n_captions"] == n_s


if __name__ == "__main__":
    main()
