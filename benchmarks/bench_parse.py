"""Captions per second of the Stanza parse, in bulk vs one call per caption, on real Flickr8k captions.

    python benchmarks/bench_parse.py                         # 2,000 captions, the small models, this CPU
    python benchmarks/bench_parse.py --n 5000 --device cuda  # on a GPU
    python benchmarks/bench_parse.py --stanza-dir DIR        # Stanza's downloaded English package instead

Side by side in one run, one Pipeline built beforehand (its build time is printed, not counted):
  bulk        pipeline.parse.parse_captions over all N captions (bulk_process, --batch-size captions per call)
  one-by-one  the same function called once per caption, on the first --n-single captions
and the ratio bulk / one-by-one, that the two give the same triples, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import load_dataset  # noqa: E402
from pipeline.parse import ParseSettings, get_pipeline, parse_captions  # noqa: E402

MODELS = ROOT / "tests" / "stanza_models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT / "tests" / "data" / "flickr8k" / "Flickr8k.token.txt"))
    ap.add_argument("--n", type=int, default=2000, help="captions parsed in bulk")
    ap.add_argument("--n-single", type=int, default=500, help="captions parsed one call each")
    ap.add_argument("--batch-size", type=int, default=512, help="captions per bulk call")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--stanza-dir", default="", help="use Stanza's package from this folder, not the small models")
    args = ap.parse_args()

    import stanza
    import torch

    torch.set_num_threads(args.threads)
    if args.stanza_dir:
        s = ParseSettings(stanza_dir=args.stanza_dir, device=args.device, batch_size=args.batch_size)
    else:
        s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                          device=args.device, batch_size=args.batch_size)
    caps = load_dataset(args.dataset).captions[: args.n]
    texts, tokens = [c.text for c in caps], [c.tokens for c in caps]
    words = sum(len(t.split()) for t in texts)

    t = time.perf_counter()
    get_pipeline(s, pretokenized=s.local_models or tokens[0] is not None)
    build = time.perf_counter() - t
    parse_captions(texts[:32], tokens[:32], s)  # warm-up

    t = time.perf_counter()
    bulk = parse_captions(texts, tokens, s)
    t_bulk = time.perf_counter() - t

    m = min(args.n_single, len(texts))
    t = time.perf_counter()
    single = [parse_captions([texts[i]], [tokens[i]], s).triples[0] for i in range(m)]
    t_single = time.perf_counter() - t

    same = sum(a == b for a, b in zip(bulk.triples[:m], single))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dev = s.device if s.device != "auto" else "auto"
    if dev.startswith("cuda"):
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    print(f"stanza {stanza.__version__}, models: {'package ' + s.package if not s.local_models else 'small (tests/)'}, "
          f"device {dev}, torch threads {torch.get_num_threads()}, batch {args.batch_size} captions")
    print(f"captions: {len(texts)} from {args.dataset} ({words / len(texts):.1f} words each)")
    print(f"pipeline build       {build:8.2f} s (not counted)")
    print(f"bulk                 {len(texts) / t_bulk:8.1f} captions/s  ({t_bulk:.2f} s for {len(texts)})")
    print(f"one call per caption {m / t_single:8.1f} captions/s  ({t_single:.2f} s for {m})")
    print(f"ratio bulk / single  {(len(texts) / t_bulk) / (m / t_single):8.2f} x")
    print(f"same triples         {same}/{m} captions")
    print(f"triples              {sum(map(len, bulk.triples)) / len(texts):.2f} per caption, failed {len(bulk.failed)}")
    print(f"peak RSS             {rss_mb:8.0f} MiB")


if __name__ == "__main__":
    main()
