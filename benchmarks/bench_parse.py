"""Captions per second of the Stanza parse: bulk vs one call per caption, the pipeline's speedups vs Stanza's own.

    python benchmarks/bench_parse.py                         # 2,000 Flickr8k captions, the small models, this CPU
    python benchmarks/bench_parse.py --n 5000 --device cuda  # on a GPU
    python benchmarks/bench_parse.py --stanza-dir DIR        # Stanza's downloaded English package instead

Side by side in one run, one Pipeline built beforehand (its build time is printed, not counted):
  bulk, the pipeline's      pipeline.parse.parse_captions over all N captions (what the pipeline runs: relations
                            scored on the decoded arcs only (pipeline.arclabels), the batched tree decoder, and
                            pipeline.tagmemo's tag strings and padded batches)
  bulk, before arc labels   the same without pipeline.arclabels (Stanza's all-pairs relation scores)
  bulk, Stanza's own        the same with Stanza's per-sentence Chu-Liu-Edmonds and its own Python (the code before)
  bulk, decoder only        the batched decoder alone
  one call per caption      the function called once per caption, on the first --n-single captions, both ways
  decoder alone             the parser batches' decoding only, replayed on the same network outputs both ways
  where the time goes       the tagger's and the parser's network passes (arc scores, and the relation scores of
                            the decoded arcs), tree decoding, the rest (Python: batching, documents, triples), for
                            the pipeline's bulk run
Rates are per CPU second of this process (time.process_time, robust on a shared machine: other work does not
count) and per wall second; the ratios use CPU seconds on the CPU, wall seconds on a GPU. Every way gives the same
triples, checked, and the decoder replay checks identical heads and relations.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import load_dataset  # noqa: E402
import pipeline.arclabels as arclabels  # noqa: E402
import pipeline.parse as parse_module  # noqa: E402
from pipeline.parse import ParseSettings, get_pipeline, parse_captions  # noqa: E402
from pipeline.arclabels import use_arc_labels  # noqa: E402
from pipeline.tagmemo import fast_batches, remember_tag_strings  # noqa: E402
from pipeline.treedecode import decode_graph_predictions, use_batched_decoder  # noqa: E402

MODELS = ROOT / "tests" / "stanza_models"


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


class Timed:
    """A function that adds its CPU seconds to ``self.cpu``."""

    def __init__(self, fn):
        self.fn, self.cpu = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.process_time()
        try:
            return self.fn(*a, **kw)
        finally:
            self.cpu += time.process_time() - t


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
    from stanza.models.depparse.model import GraphParser

    torch.set_num_threads(args.threads)
    if args.stanza_dir:
        s = ParseSettings(stanza_dir=args.stanza_dir, device=args.device, batch_size=args.batch_size)
    else:
        s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                          device=args.device, batch_size=args.batch_size)
    caps = load_dataset(args.dataset).captions[: args.n]
    texts, tokens = [c.text for c in caps], [c.tokens for c in caps]
    words = sum(len(t.split()) for t in texts)
    on_gpu = args.device.startswith("cuda")

    with Clock() as build:
        nlp = get_pipeline(s, pretokenized=s.local_models or tokens[0] is not None)
    parser = nlp.processors["depparse"].trainer.model
    parse_captions(texts[:32], tokens[:32], s)  # warm-up

    def speedups(decoder: bool, python: bool | None = None, arcs: bool | None = None) -> None:
        """The batched decoder; the tag strings and padded batches of pipeline.tagmemo, and relations scored on
        the decoded arcs (both default: with the decoder)."""
        python = decoder if python is None else python
        use_batched_decoder(nlp, decoder)
        use_arc_labels(nlp, decoder if arcs is None else arcs)
        remember_tag_strings(nlp, python)
        parse_module.fast_batches = fast_batches if python else contextlib.nullcontext

    def bulk(batched: bool, python: bool | None = None, arcs: bool | None = None):
        speedups(batched, python, arcs)
        with Clock() as c:
            out = parse_captions(texts, tokens, s)
        return out, c

    def single(batched: bool):
        speedups(batched)
        m = min(args.n_single, len(texts))
        with Clock() as c:
            out = [parse_captions([texts[i]], [tokens[i]], s).triples[0] for i in range(m)]
        return out, c

    # where the time goes, and the parser batches recorded for the decoder replay
    recorded = []

    def recording(vocab, batch_size, preds, sentlens, resolve_head_constraints=False):
        recorded.append((vocab, batch_size, preds, list(sentlens), resolve_head_constraints))
        return decode_graph_predictions(vocab, batch_size, preds, sentlens, resolve_head_constraints)

    speedups(True, arcs=False)  # the parser batches' full network outputs, for the decoder replay
    parser.decode_graph_predictions = recording
    parse_captions(texts, tokens, s)
    speedups(True)

    tagger = nlp.processors["pos"].trainer.model
    tagger_net, arc_net = Timed(tagger.forward), Timed(parser.forward_scores)
    rel_net, decoding = Timed(arclabels.arc_scores), Timed(arclabels.mst_heads)
    tagger.forward, parser.forward_scores = tagger_net, arc_net
    arclabels.arc_scores, arclabels.mst_heads = rel_net, decoding
    arclabels.counts.update(arcs=0, rescored=0, repaired=0)
    with Clock() as profiled:
        parse_captions(texts, tokens, s)
    arclabels.arc_scores, arclabels.mst_heads = rel_net.fn, decoding.fn
    del tagger.forward, parser.forward_scores
    seen = dict(arclabels.counts)

    new_bulk, c_new = bulk(True)
    pre_bulk, c_pre = bulk(True, arcs=False)
    old_bulk, c_old = bulk(False)
    dec_bulk, c_dec = bulk(True, python=False, arcs=False)
    new_single, c_new1 = single(True)
    old_single, c_old1 = single(False)
    speedups(True)

    with Clock() as d_old:
        ref = [GraphParser.decode_graph_predictions(v, b, p, sl, r) for v, b, p, sl, r in recorded]
    with Clock() as d_new:
        got = [decode_graph_predictions(v, b, p, sl, r) for v, b, p, sl, r in recorded]
    sents = sum(len(r[3]) for r in recorded)
    same_trees = sum(a == b for x, y in zip(ref, got) for a, b in zip(x, y))

    n, m = len(texts), len(new_single)
    key = "wall" if on_gpu else "cpu"
    rate = lambda k, c: k / getattr(c, key)  # noqa: E731
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dev = f"{args.device} ({torch.cuda.get_device_name()})" if on_gpu else args.device
    print(f"stanza {stanza.__version__}, models: {'package ' + s.package if not s.local_models else 'small (tests/)'}, "
          f"device {dev}, torch threads {torch.get_num_threads()}, batch {args.batch_size} captions")
    print(f"captions: {n} from {args.dataset} ({words / n:.1f} words each); ratios in {key} seconds")
    print(f"pipeline build                {build.wall:8.2f} s (not counted)")
    print(f"{'':30}{'captions/s (cpu)':>17}{'captions/s (wall)':>19}")
    for name, k, c in (("bulk, the pipeline's", n, c_new), ("bulk, before arc labels", n, c_pre),
                       ("bulk, Stanza's own", n, c_old),
                       ("bulk, batched decoder only", n, c_dec),
                       ("one call each, the pipeline's", m, c_new1), ("one call each, Stanza's", m, c_old1)):
        print(f"{name:30}{k / c.cpu:17.1f}{k / c.wall:19.1f}")
    print("  (the pipeline's: arc labels + batched decoder + remembered tag strings + numpy-padded batches; "
          "before arc labels: all but the first; Stanza's own: none)")
    print(f"bulk batched / bulk Stanza's      {rate(n, c_new) / rate(n, c_old):6.2f} x")
    print(f"bulk before arc labels / Stanza's {rate(n, c_pre) / rate(n, c_old):6.2f} x")
    print(f"bulk decoder only / Stanza's      {rate(n, c_dec) / rate(n, c_old):6.2f} x  (the decoder's share)")
    print(f"bulk batched / one call, batched  {rate(n, c_new) / rate(m, c_new1):6.2f} x")
    print(f"bulk batched / one call, Stanza's {rate(n, c_new) / rate(m, c_old1):6.2f} x")
    print(f"bulk Stanza's / one call, Stanza's{rate(n, c_old) / rate(m, c_old1):6.2f} x  (the code before)")
    print(f"decoder alone ({sents} sentences, {len(recorded)} parser batches): Stanza's {d_old.cpu:.3f} s, "
          f"batched {d_new.cpu:.3f} s cpu -> {d_old.cpu / d_new.cpu:.1f} x; identical trees {same_trees}/{sents}")
    net = tagger_net.cpu + arc_net.cpu + rel_net.cpu
    rest = profiled.cpu - net - decoding.cpu
    share = lambda x: f"{x:.2f} s ({x / profiled.cpu:.0%})"  # noqa: E731
    print(f"the pipeline's bulk, cpu {profiled.cpu:.2f} s: network {share(net)} (tagger {share(tagger_net.cpu)}, "
          f"parser's arc scores {share(arc_net.cpu)}, relations on the decoded arcs {share(rel_net.cpu)}), "
          f"tree decoding {share(decoding.cpu)}, rest of Python {share(rest)}")
    print(f"arc labels: {seen['arcs']} arcs; sentences rescored by Stanza's scorer (a near tie) {seen['rescored']}, "
          f"sent to Stanza's head-constraint repair {seen['repaired']}")
    same_bulk = sum(a == b == c == d for a, b, c, d in zip(new_bulk.triples, pre_bulk.triples, old_bulk.triples,
                                                             dec_bulk.triples))
    same_single = sum(a == b for a, b in zip(new_bulk.triples[:m], new_single)) + \
        sum(a == b for a, b in zip(new_bulk.triples[:m], old_single))
    print(f"same triples: bulk all four ways {same_bulk}/{n}; one call each vs bulk {same_single}/{2 * m}")
    print(f"triples {sum(map(len, new_bulk.triples)) / n:.2f} per caption, failed {len(new_bulk.failed)}; "
          f"peak RSS {rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
