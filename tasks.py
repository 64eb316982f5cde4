"""The Luigi tasks of defrag: thin wiring only; each task calls one function of pipeline/ or model/.

    luigi --module tasks ExtractRegions --dataset demo --local-scheduler
    luigi --module tasks ParseSentences --dataset demo --local-scheduler
    luigi --module tasks BuildVocab     --dataset demo --local-scheduler
    luigi --module tasks TrainEmbedding --dataset demo --local-scheduler
    luigi --module tasks Evaluate       --dataset demo --local-scheduler
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from pathlib import Path

import luigi
from luigi.cmdline_parser import CmdlineParser

log = logging.getLogger("defrag.tasks")


class defrag(luigi.Config):  # noqa: N801 - the section name in luigi.cfg
    cache_dir = luigi.Parameter(default="cache", description="folder of the stage-1 caches")
    run_dir = luigi.Parameter(default="runs", description="folder of the training runs")


def _same_as(param: luigi.Parameter, **changes) -> luigi.Parameter:
    """Another task's parameter (type, default, description) passed through under a new name or significance."""
    p = copy.copy(param)
    p.__dict__.update(changes)
    p._counter = luigi.Parameter._counter  # ordered where it is declared, like a new parameter
    luigi.Parameter._counter += 1
    return p


@functools.lru_cache(maxsize=4)
def _cached_dataset(dataset: str, image_root: str):
    from data import load_dataset

    return load_dataset(dataset, image_root or None)


class DatasetTask(luigi.Task):
    """Parameters every task shares: which dataset, where its images are, where caches go."""

    dataset = luigi.Parameter(default="demo", description="registered name (demo) or a dataset file path")
    image_root = luigi.Parameter(default="", description="folder the dataset's image paths are relative to")
    cache_dir = luigi.Parameter(default="", description="cache folder (default: [defrag] cache_dir)")

    def dataset_records(self):
        """The dataset, read once per process (scheduling asks every shard task for its output)."""
        return _cached_dataset(self.dataset, self.image_root)

    @property
    def cache_root(self) -> str:
        return self.cache_dir or defrag().cache_dir

    # lower bounds of this class's own numeric options (subclasses add theirs), and the command that declares
    # them (a pass-through option is named as its own stage's): checked by the preflight
    bounds: dict[str, str] = {}
    stage = ""

    def checks(self) -> dict:
        """What this task's own run() needs (pipeline.doctor checks), keyed so a graph checks each thing once."""
        from pipeline import doctor

        return {("dataset", self.dataset, self.image_root): doctor.dataset_check(self.dataset, self.image_root,
                                                                                     self.dataset_records)}

    def option_checks(self) -> dict:
        """Every numeric option in its bound and finite, and the device: keyed by the declaring class, so
        Evaluate and the training it requires check an option once."""
        from pipeline import doctor

        out = {}
        for cls in type(self).__mro__:
            stage = vars(cls).get("stage") or cls.__name__
            for name, p in vars(cls).items():
                if isinstance(p, luigi.FloatParameter):
                    out[("finite", stage, name, getattr(self, name))] = doctor.finite_check(
                        f"{stage} --{name.replace('_', '-')}", getattr(self, name))
            for name, rule in vars(cls).get("bounds", {}).items():
                value = getattr(self, name)
                out[("option", stage, name, value)] = doctor.bound_check(
                    f"{stage} --{name.replace('_', '-')}", value, rule)
        if "device" in self.param_kwargs:
            out[("device", self.device)] = doctor.device_check(self.device)
        return out

    def is_complete(self) -> bool:
        """Luigi's completeness, without the preflight."""
        return super().complete()

    def complete(self) -> bool:
        """The first time luigi asks (scheduling, before any work): preflight the graph's unfinished part."""
        if "_preflight_done" not in self.__dict__:
            self._preflight_done = True
            _preflight(self)
        return self.is_complete()


_ROOTS: list = []  # the first task asked in this process (the command's)
_PASSED: set = set()  # checks that passed in this process (a graph asks for the same ones many times)
_WALKING: list = []  # set while a preflight walks a graph: completeness asked inside it does not preflight again


def _unfinished_checks(task, seen: set) -> dict:
    """The checks of every task of the graph below ``task`` that still has work to do."""
    if task.task_id in seen:
        return {}
    seen.add(task.task_id)
    try:
        if task.is_complete():
            return {}
    except Exception:  # noqa: BLE001 - what broke it (dataset, models) is one of the checks collected here
        pass
    try:
        deps = luigi.task.flatten(task.requires())
    except Exception:  # noqa: BLE001 - likewise
        deps = []
    out = {}
    if isinstance(task, DatasetTask):
        out = task.option_checks()
        try:
            out.update(task.checks())
        except Exception as e:  # noqa: BLE001 - e.g. settings that do not resolve: a problem among the others
            out[("settings", type(e).__name__, str(e))] = _raise(e)
    for dep in deps:
        out.update(_unfinished_checks(dep, seen))
    return out


def _raise(error: Exception):
    def check() -> None:
        raise error
    return check


def _preflight(task) -> None:
    """Raise doctor.PreflightError listing every problem of the graph's unfinished part (nothing written)."""
    from pipeline import console, doctor

    if _WALKING:
        return
    if not _ROOTS and CmdlineParser.get_instance() is not None:  # a command line (not luigi.build) asks its
        _ROOTS.append(task)                                          # own task first: it prints the result at the end
        console.at_success(lambda: _print_result(task))
        console.quiet_interrupt()
    _WALKING.append(task)
    try:
        checks = {k: c for k, c in _unfinished_checks(task, set()).items() if k not in _PASSED}
    finally:
        _WALKING.pop()
    problems = doctor.run_checks(checks)
    if problems:
        raise doctor.PreflightError(doctor.report(problems))
    _PASSED.update(checks)


def device_resources(device: str) -> dict[str, int]:
    """GPU tasks declare a `gpu` resource so a scheduler never puts two on one card."""
    from pipeline.devices import resolve_device

    return {"gpu": 1} if resolve_device(device).startswith("cuda") else {}


# ---------------------------------------------------------------------------------- stage 1a: image regions

class _RegionParams(DatasetTask):
    """Parameters of region extraction; the ones marked significant change the cache (and its folder)."""

    detector = luigi.Parameter(default="torchvision-r50-fpn-v2",
                               description="torchvision-r50-fpn-v2 | torchvision-r50-fpn | "
                                           "torchvision-mobilenet-v3-fpn | detectron2:<model-zoo config> | "
                                           "butd-tsv:PATH (file or glob) | precomp:FOLDER (read, not detect)")
    detector_weights = luigi.Parameter(default="pretrained", description="pretrained | PATH | random")
    seed = luigi.IntParameter(default=0, description="initialisation seed for --detector-weights random")
    feature_dtype = luigi.ChoiceParameter(choices=["float16", "float32"], default="float16",
                                          description="how region features are stored")
    max_image_side = luigi.IntParameter(default=2048, description="shrink larger images to this side first")
    min_size = luigi.IntParameter(default=0, description="detector input short side (0: the detector's own)")
    max_size = luigi.IntParameter(default=0, description="detector input long side cap (0: the detector's own)")
    amp = luigi.BoolParameter(default=False, description="float16 autocast on CUDA")
    shard_size = luigi.IntParameter(default=1000, description="images per shard file")
    batch_size = luigi.IntParameter(default=4, significant=False, description="images per detector call")
    device = luigi.Parameter(default="auto", significant=False, description="auto (cuda when present) | cpu | cuda:N")
    on_error = luigi.ChoiceParameter(choices=["record", "fail"], default="record", significant=False,
                                     description="record unreadable images in the shard, or stop at the first")
    bounds = {"max_image_side": ">= 1", "min_size": ">= 0", "max_size": ">= 0", "shard_size": ">= 1",
              "batch_size": ">= 1", "seed": ">= 0"}
    stage = "ExtractRegions"

    def region_config(self):
        from pipeline.regions import RegionConfig

        return RegionConfig(self.detector, self.detector_weights, self.seed, self.feature_dtype,
                            self.max_image_side, self.min_size, self.max_size, self.amp)

    def checks(self) -> dict:
        from pipeline import doctor

        def need() -> int:
            return doctor.region_cache_bytes(len(self.dataset_records().images), 1024, self.feature_dtype)

        from pipeline.sources import is_source

        images = {} if is_source(self.detector) else {
            ("images", self.dataset, self.image_root): doctor.images_check(self.dataset, self.image_root,
                                                                           self.dataset_records)}
        return {**super().checks(), **images,
                ("detector", self.detector, self.detector_weights):
                    doctor.detector_check(self.detector, self.detector_weights),
                ("cache", self.cache_root, "regions"): doctor.folder_check(self.cache_root, "cache folder",
                                                                           "--cache-dir", need)}

    def region_folder(self):
        from pipeline.regions import region_cache_folder

        if "_region_folder" not in self.__dict__:  # hashed once per task: scheduling asks for it often
            self._region_folder = region_cache_folder(self.cache_root, self.dataset_records(),
                                                      self.region_config(), self.shard_size)
        return self._region_folder


class _ShardTask:
    """One shard file of a stage-1 cache: output in the stage's cache folder, a `gpu` resource on CUDA, progress."""

    shard_index = luigi.IntParameter()
    unit = "items"  # what the progress message counts

    def shard_folder(self):
        raise NotImplementedError

    @property
    def resources(self):
        return device_resources(self.device)

    def output(self):
        from pipeline.cache import shard_name

        return luigi.LocalTarget(str(self.shard_folder() / shard_name(self.shard_index)))

    def is_complete(self):
        """Done only when the shard is whole (opens, size as recorded, completion attribute): a truncated or
        unfinished shard is recomputed."""
        from pipeline.cache import shard_complete

        return shard_complete(self.output().path)

    def report_progress(self, done: int, total: int) -> None:
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"{done}/{total} {self.unit}")


class ExtractRegionShard(_ShardTask, _RegionParams):
    """One shard of images -> <cache_dir>/regions/<dataset>-<key>/shard-NNNNN.h5 (written atomically)."""

    unit = "images"

    @property
    def resources(self):
        from pipeline.sources import is_source

        return {} if is_source(self.detector) else device_resources(self.device)  # a source reads files only

    def shard_folder(self):
        return self.region_folder()

    def is_complete(self):
        """Whole, and no image it recorded as missing has appeared since (a wrong --image-root, files copied
        in later): such a shard is extracted again, so fixing the folder and rerunning is enough."""
        if not super().is_complete():
            return False
        from pipeline.regions import appeared_images
        from pipeline.sources import is_source

        if is_source(self.detector):
            return True
        back = appeared_images(self.output().path, self.dataset_records())
        if back:
            log.info("region shard %d: %d image(s) recorded as missing are now present (e.g. %s): extracting it "
                     "again", self.shard_index, len(back), back[0])
        return not back

    def run(self):
        from pipeline.devices import resolve_device
        from pipeline.regions import run_shard

        run_shard(self.dataset_records(), self.output().path, self.region_config(), shard_size=self.shard_size,
                  shard_index=self.shard_index, device=resolve_device(self.device), batch_size=self.batch_size,
                  on_error=self.on_error, progress=self.report_progress)


class ExtractRegions(_RegionParams, luigi.WrapperTask):
    """Every shard of a dataset; when all are done, logs the failures and writes them to summary.json."""

    def requires(self):
        from pipeline.cache import shard_ranges

        n = len(shard_ranges(len(self.dataset_records().images), self.shard_size))
        return [ExtractRegionShard(shard_index=i, **self.param_kwargs) for i in range(n)]

    def output(self):
        return luigi.LocalTarget(str(self.region_folder() / "summary.json"))

    def is_complete(self):
        return all(r.complete() for r in self.requires()) and self.output().exists()

    def run(self):
        import json

        from pipeline.cache import write_text_atomic
        from pipeline.regions import summarize_failures

        summary = summarize_failures(self.region_folder())
        log.info("regions of %s: %d images in %s, %d failed", self.dataset, summary["images"], summary["folder"],
                 len(summary["failed"]))
        # Replaces a summary left from before a damaged shard was recomputed (Luigi's temporary_path would refuse).
        write_text_atomic(self.output().path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------- stage 1b: sentence triples

class _ParseParams(DatasetTask):
    """Parameters of caption parsing; the significant ones change the triple cache (and its folder).

    Models: Stanza's package from --stanza-dir (download once, see README), or, offline, local model files
    --stanza-tagger PATH --stanza-parser PATH (the project's small models: tests/stanza_models/*.pt).
    """

    stanza_dir = luigi.Parameter(default="", description="Stanza resources folder (default: Stanza's own, "
                                                          "honouring STANZA_RESOURCES_DIR)")
    stanza_package = luigi.Parameter(default="default", description="Stanza package for English")
    stanza_tagger = luigi.Parameter(default="", description="local POS model file (with --stanza-parser)")
    stanza_parser = luigi.Parameter(default="", description="local dependency parser model file")
    skip_relations = luigi.Parameter(default="punct,root", description="relations that give no triple")
    max_tokens = luigi.IntParameter(default=150, description="longer captions are cut (and recorded as cut)")
    shard_size = luigi.IntParameter(default=5000, description="captions per shard file")
    batch_size = luigi.IntParameter(default=512, significant=False, description="captions per bulk Stanza call")
    device = luigi.Parameter(default="auto", significant=False, description="auto (cuda when present) | cpu | cuda:N")
    bounds = {"max_tokens": ">= 1", "shard_size": ">= 1", "batch_size": ">= 1"}
    stage = "ParseSentences"

    def parse_settings(self):
        from pipeline.parse import ParseSettings

        if "_parse_settings" not in self.__dict__:  # one object per task, so its model identity is resolved once
            self._parse_settings = ParseSettings(
                package=self.stanza_package, stanza_dir=self.stanza_dir, tagger=self.stanza_tagger,
                parser=self.stanza_parser, skip_relations=self.skip_relations, max_tokens=self.max_tokens,
                batch_size=self.batch_size, device=self.device)
        return self._parse_settings

    def checks(self) -> dict:
        from pipeline import doctor

        def need() -> int:
            return doctor.triple_cache_bytes(len(self.dataset_records().captions))

        s = self.parse_settings()
        return {**super().checks(),
                ("stanza", s.package, s.stanza_dir, s.tagger, s.parser): doctor.stanza_check(s),
                ("cache", self.cache_root, "triples"): doctor.folder_check(self.cache_root, "cache folder",
                                                                           "--cache-dir", need)}

    def triple_folder(self):
        """The triple cache folder of these parameters (for tasks that read it, e.g. training)."""
        from pipeline.parse import triple_cache_folder

        if "_triple_folder" not in self.__dict__:  # hashed once per task: scheduling asks for it often
            self._triple_folder = triple_cache_folder(self.cache_root, self.dataset_records(),
                                                      self.parse_settings(), self.shard_size)
        return self._triple_folder


class ParseShard(_ShardTask, _ParseParams):
    """One shard of captions -> <cache_dir>/triples/<dataset>-<key>/shard-NNNNN.h5 (written atomically)."""

    unit = "captions parsed"

    def shard_folder(self):
        return self.triple_folder()

    def run(self):
        from pipeline.cache import shard_ranges
        from pipeline.parse import parse_shard

        ranges = shard_ranges(len(self.dataset_records().captions), self.shard_size)
        start, stop = ranges[self.shard_index]
        parse_shard(self.dataset_records(), start, stop, self.output().path, self.parse_settings(),
                    self.shard_index, len(ranges), self.report_progress)


class ParseSentences(_ParseParams, luigi.WrapperTask):
    """Every caption shard of a dataset, parsed by Stanza into dependency triples."""

    def requires(self):
        from pipeline.cache import shard_ranges

        n = len(shard_ranges(len(self.dataset_records().captions), self.shard_size))
        return [ParseShard(shard_index=i, **self.param_kwargs) for i in range(n)]


class BuildVocab(_ParseParams):
    """Word and relation counts over the training split's triples -> <cache_dir>/vocab/<dataset>-<key>/vocab.json."""

    min_count = luigi.IntParameter(default=5, description="words seen fewer times map to <unk> (without vectors)")
    bounds = {"min_count": ">= 0"}
    word_vectors = luigi.Parameter(default="auto", description="the words are every caption word these vectors "
                                   "have: glove-6b-50d | a GloVe/word2vec text or .bin file | a .npy matrix; auto: "
                                   "glove-6b-50d for the demo when installed; none: words counted in training")

    def requires(self):
        return ParseSentences(**{k: v for k, v in self.param_kwargs.items() if k not in ("min_count", "word_vectors")})

    def vector_identity(self):
        """The word vectors' identity (source, format, sha256, dim), or None without vectors; resolved once."""
        from model.wordvecs import open_source, resolve_spec

        if "_vectors" not in self.__dict__:
            spec = resolve_spec(self.word_vectors, self.dataset)
            self._vectors = open_source(spec).identity() if spec else None
        return self._vectors

    def output(self):
        from pipeline.vocab import vocab_path

        return luigi.LocalTarget(str(vocab_path(self.cache_root, self.dataset_records().name,
                                                self.triple_folder(), self.min_count, self.vector_identity())))

    def run(self):
        from pipeline.vocab import save_vocab, vocab_from_cache

        data = self.dataset_records()
        settings = self.parse_settings()
        train = {c.caption_id for c in data.split_captions("train")}
        self.set_status_message(f"counting {len(train)} training captions")
        kw = dict(source={"triples": self.triple_folder().name, "dataset": data.describe(), "split": "train"},
                  producer=settings.producer(), dataset=data.describe())
        vectors = self.vector_identity()
        if vectors:
            from model.wordvecs import build_vector_vocab

            vocab = build_vector_vocab(self.triple_folder(), train, vectors["source"], self.output().path, **kw)
            log.info("vocabulary of %s: %d caption words with a %d-d vector from %s, %d relations -> %s",
                     self.dataset, len(vocab.words) - 1, vectors["dim"], vectors["source"], len(vocab.relations),
                     self.output().path)
            return
        vocab = vocab_from_cache(self.triple_folder(), train, self.min_count, **kw)
        save_vocab(vocab, self.output().path)
        log.info("vocabulary of %s: %d words (min count %d), %d relations -> %s", self.dataset,
                 len(vocab.words), self.min_count, len(vocab.relations), self.output().path)


# ---------------------------------------------------------------------------------- stage 2: training

_BOOL = dict(parsing=luigi.BoolParameter.EXPLICIT_PARSING)  # default-true switches: --use-mil false


class TrainEmbedding(DatasetTask):
    """Train DeFrag over the region and triple caches -> <run_dir>/<run name>/ (checkpoints, log, curves).

    Requires ExtractRegions, ParseSentences and BuildVocab, so one command runs every missing stage. Their
    parameters pass through: the detector's under their own names (--detector, --detector-weights, ...), the
    colliding ones prefixed (--detector-seed, --region-shard-size, --region-batch-size, --parse-shard-size,
    --parse-batch-size); --device applies to every stage. Complete when the run folder's summary.json exists.
    """

    # upstream: regions (ExtractRegions' parameters under the same or a prefixed name)
    detector = _same_as(_RegionParams.detector)
    detector_weights = _same_as(_RegionParams.detector_weights)
    detector_seed = _same_as(_RegionParams.seed, description="ExtractRegions --seed (random detector weights)")
    feature_dtype = _same_as(_RegionParams.feature_dtype)
    max_image_side = _same_as(_RegionParams.max_image_side)
    min_size = _same_as(_RegionParams.min_size)
    max_size = _same_as(_RegionParams.max_size)
    amp = _same_as(_RegionParams.amp)
    region_shard_size = _same_as(_RegionParams.shard_size, description="ExtractRegions --shard-size")
    region_batch_size = _same_as(_RegionParams.batch_size, description="ExtractRegions --batch-size")
    # upstream: parsing and vocabulary
    stanza_dir = _same_as(_ParseParams.stanza_dir)
    stanza_package = _same_as(_ParseParams.stanza_package)
    stanza_tagger = _same_as(_ParseParams.stanza_tagger)
    stanza_parser = _same_as(_ParseParams.stanza_parser)
    skip_relations = _same_as(_ParseParams.skip_relations)
    max_tokens = _same_as(_ParseParams.max_tokens)
    parse_shard_size = _same_as(_ParseParams.shard_size, description="ParseSentences --shard-size")
    parse_batch_size = _same_as(_ParseParams.batch_size, description="ParseSentences --batch-size")
    min_count = _same_as(BuildVocab.min_count, description="BuildVocab --min-count: rarer words map to <unk>")
    # training (model.train.TrainConfig; defaults there)
    epochs = luigi.IntParameter(default=20, description="passes over the training captions")
    batch_size = luigi.IntParameter(default=100, description="image-sentence pairs per batch (no image twice)")
    optimizer = luigi.ChoiceParameter(choices=["sgd", "adam"], default="sgd",
                                     description="sgd (with momentum) or adam")
    lr = luigi.FloatParameter(default=1e-3, description="learning rate")
    momentum = luigi.FloatParameter(default=0.9, description="SGD momentum")
    weight_decay = luigi.FloatParameter(default=1e-5, description="the paper's alpha: L2 on all parameters")
    grad_clip = luigi.FloatParameter(default=0.0, description="max gradient norm (0: off)")
    max_batches = luigi.IntParameter(default=0, description="batches per epoch at most (quick trials); 0: all")
    seed = luigi.IntParameter(default=0, description="initialisation and batch-order seed")
    # h and d of the paper (named so that --h does not collide with luigi's --help)
    embedding_dim = luigi.IntParameter(default=1000, description="h: size of the common fragment space")
    word_dim = luigi.IntParameter(default=0, description="d: word vector size (0: the vectors' size, else 200)")
    shared_relation = luigi.BoolParameter(default=False, description="one W_R for all relations (original code)")
    word_vectors = _same_as(BuildVocab.word_vectors)
    freeze_words = luigi.OptionalBoolParameter(default=None, description="keep W_e fixed (default: fixed with "
                                               "word vectors, as the original; false: fine-tune them)", **_BOOL)
    skip_unknown = luigi.BoolParameter(default=False, description="drop triples with out-of-vocabulary words")
    use_fragment = luigi.BoolParameter(default=True, description="the fragment alignment objective", **_BOOL)
    use_global = luigi.BoolParameter(default=True, description="the global ranking objective", **_BOOL)
    use_mil = luigi.BoolParameter(default=True, description="multiple-instance fragment targets", **_BOOL)
    fragment_margin = luigi.FloatParameter(default=1.0, description="margin of the fragment objective")
    fragment_scale = luigi.FloatParameter(default=1.0, description="weight of the fragment objective")
    global_margin = luigi.FloatParameter(default=40.0, description="the paper's Delta: global margin")
    global_scale = luigi.FloatParameter(default=0.5, description="the paper's beta: global weight")
    smooth = luigi.FloatParameter(default=10.0, description="n in S_kl = sum / (|l| + n)")
    threshold_global = luigi.BoolParameter(default=True, description="S_kl sums max(0, dot); false: the dot",
                                          **_BOOL)
    # running
    device = luigi.Parameter(default="auto", significant=False, description="auto (cuda when present) | cpu | cuda:N")
    memory_budget_gb = luigi.FloatParameter(default=8.0, description="larger feature caches stream from the shards")
    stream = luigi.ChoiceParameter(choices=["auto", "rows", "shards"], default="auto", significant=False,
                                   description="streamed features: rows (each batch's own, the same batches as in "
                                   "memory), shards (windows of whole shards, for caches larger than memory), auto")
    run_dir = luigi.Parameter(default="", description="runs folder (default: [defrag] run_dir)")
    run_name = luigi.Parameter(default="", description="run folder name (default: a hash of config and caches)")
    resume = luigi.BoolParameter(default=False, significant=False, description="continue from checkpoint-last.pt")
    progress = luigi.BoolParameter(default=True, significant=False, description="progress bars", **_BOOL)
    compile = luigi.BoolParameter(default=False, significant=False, description="torch.compile the training step "
                                  "(CUDA graphs on a GPU; the first epoch pays the compile)", **_BOOL)
    bounds = {"epochs": ">= 1", "batch_size": ">= 1", "embedding_dim": ">= 1", "word_dim": ">= 0", "lr": "> 0",
              "momentum": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "max_batches": ">= 0",
              "smooth": ">= 0", "memory_budget_gb": "> 0", "seed": ">= 0"}

    @property
    def resources(self):
        return device_resources(self.device)

    def checks(self) -> dict:
        from pipeline import doctor

        runs = self.run_dir or defrag().run_dir
        return {**super().checks(), ("runs", runs): doctor.folder_check(runs, "runs folder", "--run-dir"),
                ("word-dim", self.word_dim, self.word_vectors, self.dataset): self._word_dim_check}

    def _word_dim_check(self) -> None:
        """--word-dim fits the word vectors (known now: training would refuse it after stage 1 ran)."""
        try:
            vectors = self._upstream()["vocab"].vector_identity()
        except Exception:  # noqa: BLE001 - a vectors problem is BuildVocab's check
            return
        if vectors and self.word_dim and self.word_dim != int(vectors["dim"]):
            raise ValueError(f"TrainEmbedding --word-dim {self.word_dim}: the word vectors {vectors['source']!r} are "
                             f"{vectors['dim']}-d; pass --word-dim {vectors['dim']} or 0 (the vectors' size), or "
                             "--word-vectors none to learn words of another size")

    def _upstream(self):
        common = dict(dataset=self.dataset, image_root=self.image_root, cache_dir=self.cache_dir, device=self.device)
        regions = ExtractRegions(detector=self.detector, detector_weights=self.detector_weights,
                                 seed=self.detector_seed, feature_dtype=self.feature_dtype,
                                 max_image_side=self.max_image_side, min_size=self.min_size, max_size=self.max_size,
                                 amp=self.amp, shard_size=self.region_shard_size, batch_size=self.region_batch_size,
                                 **common)
        parse = dict(stanza_dir=self.stanza_dir, stanza_package=self.stanza_package, stanza_tagger=self.stanza_tagger,
                     stanza_parser=self.stanza_parser, skip_relations=self.skip_relations, max_tokens=self.max_tokens,
                     shard_size=self.parse_shard_size, batch_size=self.parse_batch_size, **common)
        return {"regions": regions, "triples": ParseSentences(**parse),
                "vocab": BuildVocab(min_count=self.min_count, word_vectors=self.word_vectors, **parse)}

    def requires(self):
        return self._upstream()

    def train_config(self):
        from model.train import TrainConfig

        alias = {"h": "embedding_dim", "d": "word_dim"}
        kw = {f: getattr(self, alias.get(f, f)) for f in TrainConfig.__dataclass_fields__}
        vectors = self._upstream()["vocab"].vector_identity()
        kw["word_vectors"] = vectors["source"] if vectors else ""
        kw["d"] = self.word_dim or (vectors["dim"] if vectors else 200)  # 0: the vectors' size
        return TrainConfig(**kw)

    def run_folder(self):
        """<run_dir>/<run name>: known before anything runs (Evaluate reads the model from here)."""
        from pathlib import Path

        from model.train import run_name

        up = self._upstream()
        keys = {"regions": up["regions"].region_folder().name, "triples": up["triples"].triple_folder().name}
        vocab_folder = Path(up["vocab"].output().path).parent.name
        name = self.run_name or run_name(self.train_config(), keys, vocab_folder, up["vocab"].vector_identity())
        return Path(self.run_dir or defrag().run_dir) / name

    def output(self):
        return luigi.LocalTarget(str(self.run_folder() / "summary.json"))

    def is_complete(self):
        """Done when the run folder's summary records the asked number of epochs (--resume --epochs N goes on)."""
        from model.train import trained_epochs

        return trained_epochs(self.run_folder()) == self.epochs

    def run(self):
        from model.train import train

        up = self._upstream()
        data = self.dataset_records()
        folder = self.run_folder()
        self.set_status_message(f"training -> {folder}")
        summary = train(self.train_config(), up["regions"].region_folder(), up["triples"].triple_folder(),
                        up["vocab"].output().path, folder.parent, splits={im.image_id: im.split for im in data.images},
                        run_name_=folder.name, resume=self.resume,
                        producers={"regions": up["regions"].region_config().producer(),
                                   "triples": up["triples"].parse_settings().producer()})
        from model.runs import write_dataset_reference

        write_dataset_reference(folder, self.dataset, self.image_root)  # retrieval finds the images and captions
        best = summary["best"] or {}
        log.info("trained %s: %d epochs, best epoch %s (val rsum %s)", folder, summary["epochs"], best.get("epoch"),
                 (best.get("val") or {}).get("rsum"))


# ---------------------------------------------------------------------------------- stage 2: evaluation

def _recorded(path: str, options: dict) -> bool:
    """Whether the JSON file at ``path`` records these option values (a missing or unreadable file does not)."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(doc.get(k) == v for k, v in options.items())


def _train_kwargs(task: luigi.Task) -> dict:
    """The TrainEmbedding parameters of a task that passes them through (every stage's, by the same names)."""
    names = set(TrainEmbedding.get_param_names(include_significant=True))
    return {k: v for k, v in task.param_kwargs.items() if k in names}


class Evaluate(TrainEmbedding):
    """Retrieval metrics of a trained run -> <run>/eval-<split>.json and eval-<split>.md (the paper's table).

    Takes every TrainEmbedding parameter (and so every stage's) and requires that training, so one command runs
    whatever is missing. Protocols: the whole split (Flickr8K/30K: 1,000 test images x 5 captions; COCO "5K")
    and, for a split of several times --fold-size images, the mean over folds (COCO "1K").
    """

    split = luigi.ChoiceParameter(choices=["train", "val", "test"], default="test",
                                 description="split to score")
    captions_per_image = luigi.IntParameter(default=5, description="first N captions of each image (0: all)")
    fold_size = luigi.IntParameter(default=1000, description="images per fold of the fold protocol (COCO 1K)")
    bounds = {"captions_per_image": ">= 0", "fold_size": ">= 1"}

    def requires(self):
        return TrainEmbedding(**_train_kwargs(self))

    def output(self):
        folder = self.run_folder()
        return {"json": luigi.LocalTarget(str(folder / f"eval-{self.split}.json")),
                "markdown": luigi.LocalTarget(str(folder / f"eval-{self.split}.md"))}

    def is_complete(self):
        """Outputs written after the training they describe (a resumed run is evaluated again)."""
        from model.train import newer_than_training

        outs = luigi.task.flatten(self.output())
        return (self.requires().is_complete() and newer_than_training(self.run_folder(), [o.path for o in outs])
                and _recorded(self.recorded_file(), self.recorded_options()))

    def recorded_file(self) -> str:
        return self.output()["json"].path

    def recorded_options(self) -> dict:
        """Options the output was made with that its file name does not show: other values make it again."""
        return {"captions_per_image": self.captions_per_image, "fold_size": self.fold_size}

    def open_run(self):
        from model.runs import open_run, write_dataset_reference
        from pipeline.devices import resolve_device

        write_dataset_reference(self.run_folder(), self.dataset, self.image_root)
        return open_run(self.run_folder(), dataset=self.dataset_records(),
                        device=resolve_device(self.device))

    def run(self):
        from model.runs import write_evaluation

        self.set_status_message(f"scoring the {self.split} split")
        write_evaluation(self.open_run(), self.split, self.captions_per_image, self.fold_size)


class Report(Evaluate):
    """A static HTML report of a run -> <run>/report/index.html: metrics, training curves, and sample queries
    of the split both ways with their alignment pictures (opens offline: relative paths only)."""

    report_queries = luigi.IntParameter(default=6, description="sample queries per direction")
    report_top = luigi.IntParameter(default=5, description="results shown per query")
    report_seed = luigi.IntParameter(default=0, description="which queries are sampled")
    bounds = {"report_queries": ">= 1", "report_top": ">= 1", "report_seed": ">= 0"}

    def requires(self):
        names = set(Evaluate.get_param_names(include_significant=True))
        return Evaluate(**{k: v for k, v in self.param_kwargs.items() if k in names})

    def output(self):
        return luigi.LocalTarget(str(self.run_folder() / "report" / "index.html"))

    def recorded_file(self) -> str:
        from model.report import OPTIONS_FILE

        return str(Path(self.output().path).with_name(OPTIONS_FILE))

    def recorded_options(self) -> dict:
        return {"split": self.split, "queries": self.report_queries, "top": self.report_top,
                "seed": self.report_seed, "image_root": str(self.dataset_records().image_root),
                **super().recorded_options()}

    def run(self):
        from model.report import build_report

        self.set_status_message("drawing alignment pictures")
        build_report(self.open_run(), self.split, n_queries=self.report_queries, top=self.report_top,
                     seed=self.report_seed, captions_per_image=self.captions_per_image,
                     fold_size=self.fold_size)


# ---------------------------------------------------------------------------------- --help

def _show_defaults(classes) -> None:
    """Append "(default: X)" to every parameter's --help text (luigi's help shows only the description)."""
    for cls in classes:
        for _, p in cls.get_params():
            if p.__dict__.get("_default_shown"):  # parameter objects are shared by subclasses: once
                continue
            d = p._default
            shown = "none" if d is luigi.parameter._no_value else (p.serialize(d) if d != "" else '""')
            p.description = f"{p.description or ''} (default: {shown})".lstrip()
            p._default_shown = True


_show_defaults([defrag, ExtractRegionShard, ExtractRegions, ParseShard, ParseSentences, BuildVocab, TrainEmbedding,
                Evaluate, Report])


# ---------------------------------------------------------------------------------- the short log

def _label(task: luigi.Task) -> str:
    index = task.param_kwargs.get("shard_index")
    return task.task_family + ("" if index is None else f" {index}")


@luigi.Task.event_handler(luigi.Event.START)
def _started(task: luigi.Task) -> None:
    from pipeline.console import open_full_log

    if isinstance(task, DatasetTask):
        open_full_log(task.cache_root)  # work starts: from here on the full log is a file
    task._started_at = time.monotonic()
    log.info("%s: started", _label(task))


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _succeeded(task: luigi.Task) -> None:
    log.info("%s: done in %.1f s", _label(task), time.monotonic() - getattr(task, "_started_at", time.monotonic()))


@luigi.Task.event_handler(luigi.Event.FAILURE)
def _failed(task: luigi.Task, error: BaseException) -> None:
    why = f"{type(error).__name__}: {error}"
    log.error("%s failed: %s", _label(task), why, extra={"failure": f"{_label(task)} failed: {why}"})


def _print_result(task: luigi.Task) -> None:
    """The main job's result on stdout: the run folder, the results table, the report."""
    if not isinstance(task, TrainEmbedding):
        return
    import json

    folder = task.run_folder()
    print(f"run folder: {folder}")
    if isinstance(task, Evaluate):
        table = folder / f"eval-{task.split}.md"
        print(table.read_text().rstrip() if table.exists() else f"(no {table.name})")
    else:
        best = json.loads((folder / "summary.json").read_text()).get("best") or {}
        print(f"best epoch {best.get('epoch')}: val rsum {(best.get('val') or {}).get('rsum')}")
    if isinstance(task, Report):
        print(f"report: {task.output().path}")
