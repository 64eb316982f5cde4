"""TrainEmbedding's work: learn the DeFrag projections over the cached fragments.

    loss = defrag_cost(batch) / B      the objective's sums divided by the batch's number of pairs B
                                       (computed as model/step.py's padded_step: same value, fixed shapes)

Dividing by B keeps the step size independent of the batch size (the paper's lr 1e-5 was for its own scale);
weight decay (the paper's alpha) is the optimizer's L2 term on every parameter. Batches never hold two captions
of one image (model/batches.py). An epoch visits every training caption once. After every epoch: R@1/5/10
both ways on the val split, checkpoint-last.pt (atomic), checkpoint-best.pt by the sum of the six recalls,
a line in log.jsonl and curves.png. ``resume=True`` continues from checkpoint-last.pt and reproduces an
uninterrupted run (the batch order of epoch e depends only on (seed, e); model, optimizer and RNG states
are restored).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.cache import cache_key, write_text_atomic
from pipeline.devices import resolve_device

from .batches import epoch_batches
from .checkpoint import BEST, LAST, CheckpointError, CheckpointUnreadable, load_checkpoint, save_checkpoint
from .defrag import DeFrag
from .step import padded_loss, padded_step, plan_epoch
from .store import FragmentStore, MemoryFeatures, Split, encode_captions, encode_images, fits_on

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # optimisation
    epochs: int = 20
    batch_size: int = 100
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-5  # the paper's alpha (L2 on all parameters)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    max_batches: int = 0  # stop each epoch after this many batches (quick trials, benchmarks); 0 = all
    seed: int = 0
    # model
    h: int = 1000
    d: int = 200
    shared_relation: bool = False
    word_vectors: str = ""  # the vectors BuildVocab built the dictionary from (model/wordvecs.py); "" = none
    freeze_words: bool | None = None  # None: fixed with word vectors (the original), learned without
    skip_unknown: bool = False
    # objective
    use_fragment: bool = True
    use_global: bool = True
    use_mil: bool = True
    fragment_margin: float = 1.0
    fragment_scale: float = 1.0
    global_margin: float = 40.0
    global_scale: float = 0.5
    smooth: float = 10.0
    threshold_global: bool = True
    # running (not part of the run's identity)
    device: str = "auto"
    memory_budget_gb: float = 8.0
    stream: str = "auto"  # features over the budget: "rows" (each batch's rows), "shards" (windows), auto
    progress: bool = True
    compile: bool = False  # torch.compile the step (CUDA graphs on a GPU: fixed shapes, no host sync)

    RUNTIME = ("device", "progress", "epochs", "memory_budget_gb", "stream", "compile")  # may change when a run resumes

    def objective_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("use_fragment", "use_global", "use_mil", "fragment_margin",
                                              "fragment_scale", "global_margin", "global_scale", "smooth",
                                              "threshold_global")}

    def identity(self) -> dict[str, Any]:
        """The options that make a run what it is. The vectors' location is not among them: the vocabulary key
        (in the run name and every checkpoint) carries their sha256 and dimension."""
        out = {k: v for k, v in asdict(self).items() if k not in self.RUNTIME}
        if out["freeze_words"] is None:
            out["freeze_words"] = bool(self.word_vectors)
        if self.word_vectors:
            out["word_vectors"] = "vocabulary"
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(names)}")
        return cls(**d)


def run_name(config: TrainConfig, cache_keys: Mapping[str, str], vocab_key: str,
             vectors: Mapping[str, Any] | None = None) -> str:
    """Deterministic run folder name: a short hash of the configuration, the caches and the vocabulary; with word
    vectors, their dimension and sha256 shown too (``-wv50-2d85b9db``).

    The epoch count is not part of it (``TrainConfig.RUNTIME``): ``--resume --epochs N`` finds the same run."""
    name = "defrag-" + cache_key({"config": config.identity(), "cache_keys": dict(cache_keys), "vocab": vocab_key},
                                 length=10)
    return name + (f"-wv{vectors['dim']}-{str(vectors['sha256'])[:8]}" if vectors else "")


def trained_epochs(run_folder: str | Path) -> int | None:
    """Epochs a finished run trained (its summary.json), or None while it has none."""
    try:
        return int(json.loads((Path(run_folder) / "summary.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newer_than_training(run_folder: str | Path, paths: list[str | Path]) -> bool:
    """Every path exists and was written after the run's summary.json (evaluations of a resumed run are stale)."""
    summary = Path(run_folder) / "summary.json"
    if not summary.exists():
        return False
    t = summary.stat().st_mtime_ns
    return all(Path(p).exists() and Path(p).stat().st_mtime_ns >= t for p in paths)


# ---------------------------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(model: DeFrag, split: Split, config: TrainConfig, device: torch.device,
             captions_per_chunk: int = 250, block_bytes: int = 16 * 2**20) -> dict[str, Any] | None:
    """R@1/5/10 both ways (and medr, meanr) on a split, with the model's global score S_kl.

    Captions are encoded and scored a chunk at a time against all image fragments, so memory holds the image
    vectors, one chunk of sentence vectors and the (n_images, n_captions) score matrix, never all of a split's
    sentence vectors; the fragment dots of a chunk are scored ``block_bytes`` at a time. Small chunks keep the
    trainer's peak memory near its data (the scores do not depend on the chunking).
    """
    from .evaluate import retrieval_metrics, score_matrix

    if split.n_images == 0 or split.n_captions == 0:
        return None
    was_training = model.training
    model.eval()
    iv, io = encode_images(model, split, device)
    scores = torch.empty(split.n_images, split.n_captions)
    for c0 in range(0, split.n_captions, captions_per_chunk):
        c1 = min(c0 + captions_per_chunk, split.n_captions)
        sv, so = encode_captions(model, split, device, c0, c1)
        scores[:, c0:c1] = score_matrix(iv, io, split.n_images, sv, so, c1 - c0,
                                        budget_bytes=block_bytes, smooth=config.smooth,
                                        threshold=config.threshold_global)
    model.train(was_training)
    m = retrieval_metrics(scores, split.caption_image.cpu())
    m["rsum"] = 100.0 * sum(m[d][f"r{k}"] for d in ("annotation", "search") for k in (1, 5, 10))
    return m


# ---------------------------------------------------------------------------------------------- helpers

def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """Records of log.jsonl up to an epoch (a resumed run drops what a killed epoch wrote after its checkpoint)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("epoch", 0) <= upto_epoch:
                out.append(rec)
    return out


def curves_figure(records: list[dict]):
    """Training loss (and its two terms) per step and epoch; validation recalls per epoch (matplotlib Figure).

    The per-step loss is the solid line on top; epoch means are markers; loss is on a log axis with several
    labelled ticks; epochs are whole numbers; the legends sit beside the axes, never over a line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2, gridspec_kw={"wspace": 0.55})
    losses = [r["loss"] for r in steps] + [r[k] for r in epochs for k in ("loss", "fragment", "global")]
    if epochs:
        x = [r["step"] for r in epochs]
        for k, m in (("loss", "o"), ("fragment", "s"), ("global", "^")):
            a.plot(x, [r[k] for r in epochs], marker=m, ls=":", lw=1, ms=5, label=f"{k} (epoch mean)", zorder=2)
        val = [r for r in epochs if r.get("val")]
        for d in ("annotation", "search"):
            for k in (1, 5, 10):
                b.plot([r["epoch"] for r in val], [100 * r["val"][d][f"r{k}"] for r in val], marker=".",
                       ls="-" if d == "annotation" else "--", label=f"{d} R@{k}")
    if steps:
        a.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.4, color="black",
               label="loss (per step)", zorder=3)
    if losses and min(losses) > 0:
        a.set_yscale("log")
        a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        a.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        a.yaxis.set_minor_formatter(FormatStrFormatter(""))
    a.set_xlabel("step"), a.set_ylabel("loss / pair")
    b.set_xlabel("epoch"), b.set_ylabel("val recall (%)")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a, b):
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.13, top=0.95)
    return fig


class RunBusy(RuntimeError):
    """Another process is training this run folder right now."""


RUN_LOCK = ".train.lock"


def hold_run_lock(folder: Path):
    """An exclusive lock on ``folder`` for as long as the returned file stays open (the OS drops it when the
    process ends, however it ends): two trainers never write one run folder."""
    import fcntl

    f = open(folder / RUN_LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunBusy(f"run {folder} is being trained right now (by {holder}): wait for it to finish (then run "
                      "the same command again), or start another run (--run-name)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def plot_curves(records: list[dict], path: Path) -> None:
    """curves.png (see ``curves_figure``), written atomically."""
    fig = curves_figure(records)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted or failed save leaves nothing behind


# where every step of an epoch has the same shapes (no host sync; what CUDA graphs need). On the CPU each batch keeps
# its own sizes: padding would only add flops there.
FIXED_SHAPE_DEVICES = {"cuda"}


def release_freed_memory() -> None:
    """Hand memory that the process freed back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps large freed blocks (its mmap threshold grows with the sizes freed), so the resident size after the
    training steps stays at their peak and validation adds to it; one trim per epoch gives it back."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _compiled(fn: Any, device: torch.device) -> Any:
    """``torch.compile`` of the step's model and cost; on a GPU with CUDA graphs ("reduce-overhead"): every
    batch of an epoch has one shape (model/step.py's plan), so one capture serves them all."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = torch.compile(fn, mode=mode, dynamic=False)

    def step(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compiler that cannot run here (no C++ compiler, no Triton, ...)
            if not type(e).__module__.startswith("torch._"):
                raise
            raise RuntimeError(f"--compile failed on {device}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                               "train without --compile (the same losses, uncompiled)") from e

    return step


def _optimizer(model: DeFrag, config: TrainConfig, pretrained_words: bool = False) -> torch.optim.Optimizer:
    """Weight decay on every trained parameter, except fine-tuned pretrained word vectors: decay would pull them
    toward zero, away from the rows of the words training never sees (those keep their vectors exactly).
    The fused update (one pass over each parameter, its gradient and momentum) is the same arithmetic as the
    plain loop: 4x faster for the 16M relation weights on the CPU."""
    params: Any = [p for p in model.parameters() if p.requires_grad]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # where torch has the fused kernels
    if pretrained_words and model.words.weight.requires_grad:
        params = [{"params": [p for p in params if p is not model.words.weight]},
                  {"params": [model.words.weight], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               fused=fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


def _window_groups(split: Split, store: FragmentStore, generator: torch.Generator) -> list[torch.Tensor] | None:
    """When features stream from shards: caption groups of windows of shards that fit half the budget, so each
    shard is read about once per epoch. None when features are in memory."""
    feats = store.features
    if not store.streaming or feats.by_rows:  # every batch reads its own rows: no windows needed
        return None
    shard = torch.as_tensor(feats.shard_of)[split.rows.cpu()]  # (N,) shard of each split image
    cap_shard = shard[split.caption_image.cpu()]  # (M,)
    order = torch.unique(shard)[torch.randperm(int(torch.unique(shard).numel()), generator=generator)]
    groups, window, used = [], [], 0
    for s in order.tolist():
        if window and used + feats.shard_bytes[s] > feats.max_bytes // 2:
            groups.append(torch.isin(cap_shard, torch.tensor(window)).nonzero().squeeze(1))
            window, used = [], 0
        window.append(s)
        used += feats.shard_bytes[s]
    if window:
        groups.append(torch.isin(cap_shard, torch.tensor(window)).nonzero().squeeze(1))
    return groups


def check_trainable(store: FragmentStore, split: Split) -> None:
    """Refuse a training split the objective cannot learn from, naming the cause (no silent constant loss)."""
    where = f"the train split of {store.triple_folder} and {store.region_folder}"
    if split.n_captions == 0:
        raise ValueError(f"no training captions with images in {where}: check the caches and the dataset's "
                         "train split")
    c = split.cap_rows
    if int((store.offsets[c + 1] - store.offsets[c]).sum()) == 0:
        raise ValueError(f"no sentence fragments in {where}: all {split.n_captions} training captions have zero "
                         "dependency triples (one-word or unparseable captions, or every triple dropped by "
                         "--skip-unknown); check the captions and the parser")
    if int(store.mask[split.rows].sum()) == 0:
        raise ValueError(f"no image fragments in {where}: every training image has an empty mask; rebuild the "
                         "region cache")
    unk = getattr(store.vocab, "unk", "<unk>")
    if not [w for w in store.vocab.words if w != unk]:
        raise ValueError(f"the vocabulary of {where} holds only {unk}: every word is rarer than --min-count or "
                         "the captions have no triples; lower --min-count or check the captions")


def _load_for_resume(last: Path, vocab_key: str, cache_keys: Mapping[str, str]) -> dict[str, Any]:
    """checkpoint-last.pt for --resume; a damaged one is named with the way out (the best checkpoint)."""
    try:
        return load_checkpoint(last, vocab_key, cache_keys)
    except CheckpointUnreadable as e:
        best = last.with_name(BEST)
        try:
            epoch = int(load_checkpoint(best, vocab_key, cache_keys)["epoch"])
        except CheckpointError:
            raise CheckpointError(f"{e}; {best.name} cannot be used either: start a new run (--run-name)") from None
        raise CheckpointError(f"{e}. To resume from the best epoch ({epoch}) instead: cp {best} {last}, then "
                              "rerun with --resume; or start a new run (--run-name)") from None


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


def _place(store: FragmentStore, device: torch.device) -> None:
    """Move the store to the GPU once when its features fit (with room to train); else gather on the CPU."""
    if device.type != "cuda":
        return
    loaded_there = isinstance(store.features, MemoryFeatures) and store.features.feats.is_cuda  # by the store
    if loaded_there or fits_on(device, 0 if store.streaming else store.feature_bytes):
        store.to(device)
    else:
        log.info("features (%.2f GB) do not fit the GPU's free %.2f GB: batches are gathered on the CPU",
                 store.feature_bytes / 1e9, torch.cuda.mem_get_info(device)[0] / 1e9)


# ---------------------------------------------------------------------------------------------- training

def train(config: TrainConfig | Mapping[str, Any], region_folder: str | Path, triple_folder: str | Path,
          vocab_path: str | Path | Any, run_dir: str | Path, *, splits: Mapping[str, str] | None = None,
          run_name_: str | None = None, resume: bool = False, store: FragmentStore | None = None,
          producers: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Train DeFrag on the caches; write the run folder ``<run_dir>/<run name>/``; return the summary.

    ``splits`` maps image id -> split (the dataset's); ``store`` may pass an already built FragmentStore
    (benchmarks and tests reuse one). ``resume`` continues from checkpoint-last.pt of the run folder.
    ``producers`` ({"regions", "triples"}: producer records) makes the store refuse shards of any other producer.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    device = torch.device(resolve_device(cfg.device))
    if store is None:
        if splits is None:
            raise ValueError("train() needs the dataset's splits (image id -> split) or a built store")
        store = FragmentStore(region_folder, triple_folder, vocab_path, splits, skip_unknown=cfg.skip_unknown,
                              memory_budget_bytes=int(cfg.memory_budget_gb * 2**30), stream=cfg.stream,
                              producers=producers,
                              device=device)
    if store.skip_unknown != cfg.skip_unknown:
        raise ValueError(f"the store was built with skip_unknown={store.skip_unknown}, the configuration asks for "
                         f"{cfg.skip_unknown}")
    vocab_key = str(store.vocab.key)
    vectors = store.vocab.vectors
    if cfg.word_vectors and vectors is None:
        raise ValueError(f"word vectors {cfg.word_vectors!r} were asked for, but the vocabulary was counted without "
                         "them: build it with BuildVocab --word-vectors (TrainEmbedding passes it on)")
    if cfg.freeze_words is None:
        cfg = replace(cfg, freeze_words=vectors is not None)  # the original: pretrained vectors stay fixed
    if vectors is not None and int(vectors["dim"]) != cfg.d:
        raise ValueError(f"the word vectors {vectors['source']!r} are {vectors['dim']}-d but d={cfg.d}: pass "
                         f"--word-dim {vectors['dim']} (or leave --word-dim at 0, the vectors' size)")
    name = run_name_ or run_name(cfg, store.cache_keys, vocab_key, vectors)
    train_split, val_split = store.split("train"), store.split("val")
    check_trainable(store, train_split)
    out = Path(run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_run_lock(out)  # released in the finally below: a failed train() frees the folder at once
    try:

        torch.manual_seed(cfg.seed)
        word_init = None if vectors is None else torch.from_numpy(store.vocab.vector_rows)  # (n_words, d)
        model = DeFrag(store.feat_dim, store.n_words, store.n_relations, h=cfg.h, d=cfg.d,
                       shared_relation=cfg.shared_relation, word_vectors=word_init,
                       freeze_words=cfg.freeze_words).to(device)
        opt = _optimizer(model, cfg, pretrained_words=vectors is not None)
        start_epoch, best, history = 0, None, []

        sources = {"regions": str(region_folder), "triples": str(triple_folder), "vocab": str(vocab_path)}
        last_path = out / LAST
        if last_path.exists() and not resume:
            raise CheckpointError(f"{out} already holds a run ({LAST}): pass resume (--resume) to continue it, or "
                                  "another run name (--run-name) to start a new one")
        if resume and last_path.exists():
            ckpt = _load_for_resume(last_path, vocab_key, store.cache_keys)  # on the CPU: RNG states must be
            if ckpt["config"] != cfg.identity():
                diff = {k: (ckpt["config"].get(k), v) for k, v in cfg.identity().items() if ckpt["config"].get(k) != v}
                raise CheckpointError(f"{last_path} was trained with other options (checkpoint, now): {diff}; "
                                      "resume with the same options or start a new run (--run-name)")
            if int(ckpt["epoch"]) > cfg.epochs:
                raise CheckpointError(f"{last_path} has already trained {ckpt['epoch']} epochs, more than --epochs "
                                      f"{cfg.epochs}: pass --epochs {ckpt['epoch']} or more, or start a new run "
                                      "(--run-name)")
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])
            start_epoch, best, history = int(ckpt["epoch"]), ckpt.get("best"), list(ckpt["history"])
            log.info("resuming %s after epoch %d", out, start_epoch)
        run_config = {"name": name, "config": asdict(cfg), "sources": sources, "cache_keys": store.cache_keys,
                      "vocab_key": vocab_key, "word_vectors": vectors, "store": store.describe()}
        write_text_atomic(out / "config.json", json.dumps(run_config, indent=2) + "\n")
        records = _read_log(out / "log.jsonl", start_epoch)
        write_text_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))

        _place(store, device)
        obj = cfg.objective_kwargs()
        loss_fn = _compiled(padded_loss, device) if cfg.compile else padded_loss
        sizes = (0, 0)  # the fixed (max triples, max relation group) of the GPU step
        # a compiled step needs them everywhere: a new shape per batch would mean a new compile per batch
        fixed_shapes = device.type in FIXED_SHAPE_DEVICES or cfg.compile
        steps_per_log = 20
        step = history[-1]["step"] if history else 0
        t_run = time.time()
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # the epoch's batches: (seed, epoch)
            batches = epoch_batches(train_split.caption_image, cfg.batch_size, gen,
                                    _window_groups(train_split, store, gen))
            if cfg.max_batches:
                batches = batches[:cfg.max_batches]
            plan = plan_epoch(train_split, batches, store.n_relations, store.device)
            if fixed_shapes:  # sizes only grow over a run: a compiled step keeps its shapes across epochs
                sizes = (max(sizes[0], plan.max_triples), max(sizes[1], plan.max_group))
            fixed = sizes if fixed_shapes else (None, None)
            model.train()
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, fragment, global (per pair, summed)
            window = torch.zeros(3, dtype=torch.float64, device=device)
            n_win = 0
            bar = None
            if cfg.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(plan.batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
            log_lines = []
            for b, caps in enumerate(plan.batches):
                loss, frag, glob = padded_step(model, train_split, caps, device, obj, *fixed, loss_fn=loss_fn)
                if b + 1 < len(plan.batches):  # streamed features: the next batch's rows are read during the backward
                    train_split.prefetch_images(plan.batches[b + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                vals = torch.stack([loss.detach(), frag, glob]).double()
                sums += vals
                window += vals
                n_win += 1
                if n_win == steps_per_log or b == len(batches) - 1:
                    w = (window / n_win).tolist()  # one device sync per log window, not per step
                    if not math.isfinite(w[0]):
                        raise FloatingPointError(f"loss became {w[0]} in epoch {epoch + 1}, step {step}: lower the "
                                                 f"learning rate (now {cfg.lr}) or set grad_clip")
                    log_lines.append({"kind": "step", "epoch": epoch + 1, "step": step, "loss": w[0],
                                      "fragment": w[1], "global": w[2]})
                    if bar is not None:
                        bar.set_postfix(loss=f"{w[0]:.4g}")
                    window.zero_()
                    n_win = 0
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            train_s = time.time() - t0
            mean = (sums / max(1, len(batches))).tolist()
            opt.zero_grad(set_to_none=True)  # the gradients are not needed again before the next step
            release_freed_memory()  # the steps' freed temporaries go back to the system before validation
            t1 = time.time()
            val = validate(model, val_split, cfg, device)
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": step, "loss": mean[0], "fragment": mean[1],
                   "global": mean[2], "batches": len(batches), "train_seconds": train_s,
                   "val_seconds": time.time() - t1, "val": val}
            history.append(rec)
            improved = best is None or (val is not None and val["rsum"] > (best.get("val") or {}).get("rsum", -1))
            if val is None:
                improved = True  # no val split: the latest epoch is the best we know
            if improved:
                best = rec
            state = {"model": model.state_dict(), "model_config": model.config(), "optimizer": opt.state_dict(),
                     "epoch": epoch + 1, "rng": _rng_state(), "config": cfg.identity(), "vocab_key": vocab_key,
                     "cache_keys": dict(store.cache_keys), "vocab_words": list(store.vocab.words),
                     "vocab_relations": list(store.vocab.relations), "sources": sources, "history": history,
                     "best": best}
            save_checkpoint(last_path, state, also=out / BEST if improved else None)
            with (out / "log.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in log_lines + [rec])
            records += log_lines + [rec]
            plot_curves(records, out / "curves.png")
            v = f", val rsum {val['rsum']:.1f}" if val else ""
            log.info("epoch %d/%d: loss %.4g (fragment %.4g, global %.4g), %.1fs%s", epoch + 1, cfg.epochs,
                     mean[0], mean[1], mean[2], train_s, v)

        summary = {"run_dir": str(out), "name": name, "epochs": len(history), "best": best,
                   "last": history[-1] if history else None, "seconds": time.time() - t_run,
                   "device": str(device), "store": store.describe()}
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        lock.close()
