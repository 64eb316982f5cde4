"""Stanza parsing of captions, in bulk, into typed dependency triples (stage 1 for sentences).

One Stanza ``Pipeline`` (tokenize, pos, lemma, depparse) per process, built once per settings and reused; the
captions of a shard go through it ``batch_size`` documents at a time with ``Pipeline.bulk_process``, never one
call per caption. The Pipeline itself never touches the network (``download_method=None``). Its dependency
trees are decoded a parser batch at a time by ``pipeline.treedecode`` (identical to Stanza's per-sentence decoder),
and ``pipeline.tagmemo`` builds the tagger's strings and the loaders' padded batches faster (identical results).

Two ways to name the models:
  * Stanza's English package (users): models downloaded once into the resources folder (``stanza_dir``,
    default Stanza's own, which honours STANZA_RESOURCES_DIR), automatically the first time they are missing
    when the network answers within seconds, else by hand with ``DOWNLOAD_COMMAND``.
  * Local model files (offline, tests): ``tagger`` and ``parser`` paths, e.g. the project's small models in
    tests/stanza_models/. Then the lemmatizer is the identity (lemma = word) and captions are always passed
    pretokenized: given tokens, else ``regex_tokenize`` of the text (there is no tokenizer model).

Per caption: HTML entities are unescaped and tags dropped, whitespace collapsed, the caption parsed as one
sentence, cut to ``max_tokens`` words (recorded as truncated; Stanza's parser batches must hold the longest
sentence). Captions without a word character (empty, punctuation or emoji only) get no triples; a caption
Stanza fails on is recorded in the shard's failures and gets no triples; neither stops the shard.
"""
from __future__ import annotations

import atexit
import html
import json
import logging
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from .cache import cache_folder, file_sha256, write_triple_shard
from .network import reachable
from .arclabels import use_arc_labels
from .tagmemo import fast_batches, remember_tag_strings
from .treedecode import use_batched_decoder
from .triples import DEFAULT_SKIP_RELATIONS, Triple, document_triples, parse_skip_relations

log = logging.getLogger(__name__)

PROCESSORS = "tokenize,pos,lemma,depparse"
DOWNLOAD_COMMAND = ("python -c \"import stanza; stanza.download('en', processors='tokenize,pos,lemma,depparse', "
                    "model_dir='STANZA_DIR')\"")
TEXT_CLEANING = "html-unescape,strip-tags,collapse-whitespace"
POS_BATCH_SENTENCES = 1000
DEPPARSE_BATCH_WORDS = 5000  # Stanza's parser batches are counted in words and must exceed the longest sentence


class StanzaModelsMissing(RuntimeError):
    """Stanza's models are not where the settings say; the message names --stanza-dir and the download command."""


# ---------------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ParseSettings:
    lang: str = "en"
    package: str = "default"  # Stanza package (ignored when tagger and parser paths are given)
    stanza_dir: str = ""  # Stanza resources folder; "" = Stanza's default (STANZA_RESOURCES_DIR honoured)
    tagger: str = ""  # local POS model file (.pt); with parser, replaces the package
    parser: str = ""  # local dependency parser model file (.pt)
    skip_relations: tuple[str, ...] = DEFAULT_SKIP_RELATIONS
    max_tokens: int = 150
    use_given_tokens: bool = True  # parse the dataset's own tokens (Karpathy JSON) pretokenized
    batch_size: int = 512  # captions per bulk call; not part of the cache key
    device: str = "auto"  # not part of the cache key either
    _models: dict = field(default=None, compare=False, hash=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_relations", parse_skip_relations(self.skip_relations))
        if bool(self.tagger) != bool(self.parser):
            raise ValueError("give both a tagger and a parser model file (--stanza-tagger and --stanza-parser), "
                             "or neither to use the Stanza package in --stanza-dir")
        if self.max_tokens < 1 or self.max_tokens > DEPPARSE_BATCH_WORDS:
            raise ValueError(f"max_tokens must be in 1..{DEPPARSE_BATCH_WORDS}, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def local_models(self) -> bool:
        return bool(self.tagger)

    @property
    def resources_dir(self) -> str:
        if self.stanza_dir:
            return str(Path(self.stanza_dir).expanduser())
        from stanza.resources.common import DEFAULT_MODEL_DIR

        return DEFAULT_MODEL_DIR

    def models(self) -> dict:
        """Identity of the models: file hashes for local files, package + md5s from resources.json otherwise.

        Raises StanzaModelsMissing at once when they are not there.
        """
        if self._models is None:
            object.__setattr__(self, "_models", _local_models(self) if self.local_models else _package_models(self))
        return self._models

    def producer(self) -> dict:
        """Everything that changes the triples: the cache key and the attribute every shard carries."""
        import stanza

        return {"parser": "stanza", "stanza": stanza.__version__, "lang": self.lang, "processors": PROCESSORS,
                "models": self.models(), "lemmatizer": "identity" if self.local_models else "stanza",
                "tokenizer": "regex" if self.local_models else "stanza", "given_tokens": self.use_given_tokens,
                "skip_relations": list(self.skip_relations), "max_tokens": self.max_tokens,
                "text_cleaning": TEXT_CLEANING, "lowercase": True}

    @classmethod
    def from_producer(cls, producer: Mapping[str, Any], **runtime: Any) -> "ParseSettings":
        """Settings that parse new text exactly as a cache was parsed (``runtime``: batch_size, device,
        stanza_dir, and tagger/parser files). Local model files are found by their recorded sha256 when not
        given: in ``stanza_dir``, the project's tests/stanza_models/ and the current folder."""
        models = producer["models"]
        kw: dict[str, Any] = {"lang": producer["lang"], "skip_relations": tuple(producer["skip_relations"]),
                              "max_tokens": producer["max_tokens"], "use_given_tokens": producer["given_tokens"]}
        runtime = {k: v for k, v in runtime.items() if v}
        if "pos" in models:
            folders = [runtime["stanza_dir"]] if runtime.get("stanza_dir") else []
            for proc, key in (("pos", "tagger"), ("depparse", "parser")):
                if key not in runtime:
                    runtime[key] = find_model_file(models[proc], folders)
        else:
            kw["package"] = models["package"]
        kw.update(runtime)
        settings = cls(**kw)
        if settings.local_models and settings.models() != models:
            raise StanzaModelsMissing(f"the model files given ({json.dumps(settings.models())}) are not the ones "
                                      f"the cache was parsed with ({json.dumps(models)}): give those files with "
                                      "--stanza-tagger and --stanza-parser")
        return settings

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("_models")
        return d


def _local_models(s: ParseSettings) -> dict:
    """Local model files by content only (sha256), so the cache key is the same wherever the files live."""
    out = {}
    for proc, p in (("pos", s.tagger), ("depparse", s.parser)):
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise StanzaModelsMissing(f"Stanza {proc} model file {path} does not exist: give an existing file "
                                      f"(--stanza-tagger / --stanza-parser), or rebuild the project's small models "
                                      f"with tests/stanza_models/build_models.sh")
        out[proc] = {"sha256": file_sha256(path)}
    return out


# a parameter name only each kind of Stanza model has: the tagger's UPOS classifier, the parser's arc scorer
_ROLE_KEY = {"pos": ("upos_clf.", "a POS tagger"), "depparse": ("unlabeled.", "a dependency parser")}


def _wrong_role(path: Path, proc: str, flag: str) -> str:
    """Why the file given for ``proc`` is not a Stanza model of that kind ('' when it is); read without
    unpickling code."""
    import torch

    try:
        keys = list(torch.load(path, map_location="cpu", weights_only=True)["model"])
    except Exception as e:  # noqa: BLE001 - not a Stanza model file; torch's text (it advises unpickling) is not shown
        return (f"{flag} {path} is not a Stanza model file ({type(e).__name__}): give the model file itself "
                "(tests/stanza_models/*.pt are the project's small ones)")
    kinds = [k for k, (prefix, _) in _ROLE_KEY.items() if any(n.startswith(prefix) for n in keys)]
    if proc in kinds:
        return ""
    what = f"it is {_ROLE_KEY[kinds[0]][1]}" if kinds else "nor a tagger or parser"
    return f"{flag} {path} is not {_ROLE_KEY[proc][1]} ({what})"


PROJECT_MODELS = Path(__file__).resolve().parents[1] / "tests" / "stanza_models"


def find_model_file(model: Mapping[str, Any], folders: Sequence[str | Path] = ()) -> str:
    """The path of a local model file recorded as ``{"sha256": ...}`` (older caches also name a "path"):
    looked for in ``folders``, the project's tests/stanza_models/ and the current folder (``*.pt``)."""
    hint = model.get("path")
    candidates = [Path(hint)] if hint else []
    for folder in [*folders, PROJECT_MODELS, Path.cwd()]:
        candidates += sorted(Path(folder).expanduser().glob("*.pt"))
    for c in candidates:
        if c.is_file() and file_sha256(c) == model["sha256"]:
            return str(c)
    raise StanzaModelsMissing(f"no Stanza model file with sha256 {model['sha256']} in "
                              f"{', '.join(str(f) for f in [*folders, PROJECT_MODELS, Path.cwd()])}: give the files "
                              "the cache was parsed with (--stanza-tagger PATH --stanza-parser PATH, or "
                              "--stanza-dir FOLDER holding them)")


def stanza_host() -> str:
    """Where Stanza downloads its models from."""
    from stanza.resources.common import DEFAULT_RESOURCES_URL

    return urllib.parse.urlparse(DEFAULT_RESOURCES_URL).hostname or ""


def require_models(s: ParseSettings) -> None:
    """Raise StanzaModelsMissing (naming every way out) unless the models are here or can be downloaded now."""
    if s.local_models:
        _local_models(s)
        wrong = [w for proc, path, flag in (("pos", s.tagger, "--stanza-tagger"),
                                            ("depparse", s.parser, "--stanza-parser"))
                 if (w := _wrong_role(Path(path).expanduser(), proc, flag))]
        if wrong:
            raise StanzaModelsMissing("; ".join(wrong) + (". Give the tagger with --stanza-tagger and the parser "
                                                         "with --stanza-parser" if len(wrong) == 2 else ""))
        return
    try:
        _resolve_package(s)
    except StanzaModelsMissing:
        if not reachable(stanza_host())[0]:
            raise


def _missing(s: ParseSettings, what: str) -> StanzaModelsMissing:
    d = s.resources_dir
    return StanzaModelsMissing(
        f"Stanza models for {s.lang!r} (package {s.package!r}) are not in the resources folder {d}: {what}. "
        f"Download them once (needs network): {DOWNLOAD_COMMAND.replace('STANZA_DIR', d)} ; or point "
        f"--stanza-dir at a folder that has them; or, offline, give local model files with --stanza-tagger and "
        f"--stanza-parser (the project's small models are in tests/stanza_models/)")


def _package_models(s: ParseSettings) -> dict:
    """The package's models, downloaded once into the resources folder when missing and the network answers."""
    try:
        return _resolve_package(s)
    except StanzaModelsMissing:
        if not _download_package(s):
            raise
        return _resolve_package(s)


def _download_package(s: ParseSettings) -> bool:
    import stanza

    host = stanza_host()
    ok, why = reachable(host)
    if not ok:
        log.debug("Stanza models missing and %s is unreachable (%s): not downloading", host, why)
        return False
    log.info("downloading Stanza %s models (package %s) into %s, once", s.lang, s.package, s.resources_dir)
    try:
        stanza.download(s.lang, model_dir=s.resources_dir, package=s.package, processors=PROCESSORS,
                        logging_level="WARN")
    except Exception as e:  # noqa: BLE001 - any download failure ends in the same clear message
        log.warning("Stanza download failed: %s", e)
        return False
    return True


def _resolve_package(s: ParseSettings) -> dict:
    """Resolve the package the way Stanza's Pipeline does and name each model by resources.json's md5."""
    from stanza.resources.common import maintain_processor_list, process_pipeline_parameters

    res_file = Path(s.resources_dir) / "resources.json"
    if not res_file.is_file():
        raise _missing(s, "there is no resources.json")
    try:
        resources = json.loads(res_file.read_text())
    except (OSError, ValueError) as e:
        raise _missing(s, f"{res_file} cannot be read ({e})") from None
    if s.lang not in resources:
        raise _missing(s, f"resources.json has no {s.lang!r} entry")
    lang, _, package, processors = process_pipeline_parameters(s.lang, s.resources_dir, s.package, PROCESSORS)
    try:
        resolved = maintain_processor_list(resources, lang, package, processors)
    except (KeyError, ValueError, TypeError) as e:
        raise _missing(s, f"resources.json does not describe package {s.package!r} ({type(e).__name__}: {e})") \
            from None
    out: dict[str, Any] = {"package": s.package}
    for proc, specs in resolved:
        for spec in specs:
            if spec.package == "identity":
                continue
            entry = resources[lang].get(proc, {}).get(spec.package, {})
            model_file = Path(s.resources_dir) / lang / proc / f"{spec.package}.pt"
            if not model_file.is_file():
                raise _missing(s, f"{model_file} does not exist")
            out[proc] = {"package": spec.package, "md5": entry.get("md5", "")}
    return out


# ---------------------------------------------------------------------------------------------------- text

_TAG = re.compile(r"<[^>\n]{0,200}>")
_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+(?:[-'’.]\w+)*|([^\w\s])\1*")  # words; a run of one punctuation mark ("...")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m|’s)$", re.IGNORECASE)


def clean_text(text: str) -> str:
    """Caption text as parsed: HTML entities unescaped, tags dropped, whitespace (newlines too) collapsed."""
    return _WS.sub(" ", _TAG.sub(" ", html.unescape(text or ""))).strip()


def regex_tokenize(text: str) -> list[str]:
    """Words, punctuation marks and English clitics ("do n't", "dog 's"), for models without a tokenizer."""
    out = []
    for tok in (m.group(0) for m in _TOKEN.finditer(text)):
        m = _CLITIC.match(tok)
        out += [m.group(1), m.group(2)] if m and len(tok) > len(m.group(2)) else [tok]
    return out


@dataclass
class CaptionInput:
    """What goes into Stanza for one caption: a token list (pretokenized) or text, and whether it was cut."""
    tokens: list[str] | None
    text: str
    truncated: bool

    @property
    def empty(self) -> bool:
        return not (self.tokens if self.tokens is not None else self.text)


_WORD = re.compile(r"\w")


def prepare(text: str, tokens: Sequence[str] | None, s: ParseSettings) -> CaptionInput:
    """Tokens (or text) to parse; a caption without a single word character (empty, punctuation or emoji
    only) is left empty: it has no fragments to give."""
    if not _WORD.search(" ".join(tokens) if tokens is not None and s.use_given_tokens else text or ""):
        return CaptionInput([], "", truncated=False)
    if tokens is not None and s.use_given_tokens:
        toks = [t for t in (_WS.sub("_", str(t).strip()) for t in tokens) if t]
    elif s.local_models:
        toks = regex_tokenize(clean_text(text))
    else:  # Stanza's tokenizer; cut by whitespace words (and characters, for text without spaces)
        words = clean_text(text).split(" ")
        cut = " ".join(words[: s.max_tokens])
        cut = cut[: 20 * s.max_tokens]
        return CaptionInput(None, cut, truncated=cut != " ".join(words))
    return CaptionInput(toks[: s.max_tokens], " ".join(toks[: s.max_tokens]), truncated=len(toks) > s.max_tokens)


# ---------------------------------------------------------------------------------------------------- pipeline

_PIPELINES: dict[tuple, Any] = {}
_RESOURCE_DIRS: dict[str, str] = {}


def _minimal_resources(lang: str) -> str:
    """A resources folder holding only a minimal resources.json: enough for a Pipeline over local model files."""
    if lang not in _RESOURCE_DIRS:
        d = tempfile.mkdtemp(prefix="defrag-stanza-")
        atexit.register(shutil.rmtree, d, True)
        Path(d, "resources.json").write_text(json.dumps({lang: {"lang_name": lang, "default_processors": {}}}))
        _RESOURCE_DIRS[lang] = d
    return _RESOURCE_DIRS[lang]


def get_pipeline(s: ParseSettings, pretokenized: bool):
    """The process's Stanza Pipeline for these settings, built on first use and reused after."""
    from .devices import resolve_device

    device = resolve_device(s.device)
    key = (s.lang, s.package, s.resources_dir, s.tagger, s.parser, pretokenized, device)
    if key in _PIPELINES:
        return _PIPELINES[key]
    s.models()  # fail now, with our message, when the models are missing
    import stanza
    from stanza.resources.common import ResourcesFileNotFoundError

    kw: dict[str, Any] = dict(processors=PROCESSORS, download_method=None, logging_level="WARN",
                              tokenize_pretokenized=pretokenized, tokenize_no_ssplit=True,
                              pos_batch_size=POS_BATCH_SENTENCES, depparse_batch_size=DEPPARSE_BATCH_WORDS,
                              use_gpu=device.startswith("cuda"), device=device)
    if s.local_models:
        kw.update(dir=_minimal_resources(s.lang), pos_model_path=str(Path(s.tagger).expanduser()),
                  depparse_model_path=str(Path(s.parser).expanduser()), lemma_use_identity=True,
                  pos_pretrain_path=None, depparse_pretrain_path=None)
    else:
        kw.update(dir=s.resources_dir, package=s.package)
    log.info("building the Stanza pipeline (%s, %s, pretokenized=%s, device=%s)", s.lang,
             "local models" if s.local_models else f"package {s.package}", pretokenized, device)
    try:
        nlp = stanza.Pipeline(s.lang, **kw)
    except (ResourcesFileNotFoundError, FileNotFoundError) as e:
        raise _missing(s, str(e)) from e
    use_batched_decoder(nlp)  # Stanza's trees, decoded for a whole parser batch at once
    use_arc_labels(nlp)  # relations scored on the decoded arcs only (Stanza's labels)
    remember_tag_strings(nlp)  # each tag string built once (the same strings)
    _PIPELINES[key] = nlp
    return nlp


@dataclass
class ParsedCaptions:
    """Parse results in caption order, shaped for ``pipeline.cache.write_triple_shard``."""
    triples: list[list[Triple]] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # caption index -> reason


def _to_document(inp: CaptionInput):
    import stanza

    return stanza.Document([], text=inp.text)  # pretokenized: Stanza splits on the single spaces we joined with


def _parse_group(s: ParseSettings, inputs: list[CaptionInput], pretokenized: bool) -> list[Any]:
    """Parsed Documents (or an Exception per caption that failed) for captions of one input kind."""
    nlp = get_pipeline(s, pretokenized)
    docs = [_to_document(i) for i in inputs]
    try:
        with fast_batches():  # the same padded batches, built in one numpy step each
            return nlp.bulk_process(docs)
    except Exception as e:  # noqa: BLE001 - one bad caption must not stop the shard: find it, keep the rest
        log.warning("bulk parse of %d captions failed (%s); parsing them one by one", len(docs), e)
    out = []
    for d in docs:
        try:
            out.append(nlp.bulk_process([d])[0])
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def parse_captions(texts: Sequence[str], tokens: Sequence[Sequence[str] | None] | None, s: ParseSettings,
                   progress: Callable[[int, int], None] | None = None, desc: str = "parse") -> ParsedCaptions:
    """Parse captions in bulk; ``tokens[i]`` (or None) are the dataset's own tokens for caption i."""
    n = len(texts)
    tokens = tokens if tokens is not None else [None] * n
    out = ParsedCaptions([[] for _ in range(n)], [0] * n, [False] * n, {})
    with tqdm(total=n, desc=desc, unit="cap", disable=None) as bar:
        for start in range(0, n, s.batch_size):
            idx = range(start, min(start + s.batch_size, n))
            inputs = {i: prepare(texts[i], tokens[i], s) for i in idx}
            for i in idx:
                out.truncated[i] = inputs[i].truncated
            for pretok in (True, False):
                group = [i for i in idx if not inputs[i].empty and (inputs[i].tokens is not None) == pretok]
                if not group:
                    continue
                for i, doc in zip(group, _parse_group(s, [inputs[i] for i in group], pretok)):
                    if isinstance(doc, Exception):
                        out.failed[i] = f"stanza failed: {type(doc).__name__}: {doc}"
                        continue
                    out.triples[i], out.num_tokens[i] = document_triples(doc, s.skip_relations)
            bar.update(len(idx))
            if progress is not None:
                progress(idx.stop, n)
    return out


def parse_texts(texts: Sequence[str], s: ParseSettings) -> list[list[Triple]]:
    """Triples of free-text sentences parsed exactly as a cache with these settings (e.g. a retrieval query)."""
    return parse_captions(list(texts), None, s, desc="parse query").triples


# ---------------------------------------------------------------------------------------------------- shards

def triple_cache_folder(cache_dir: str | Path, dataset: Any, s: ParseSettings, shard_size: int) -> Path:
    """``<cache_dir>/triples/<dataset>-<key>``, the key a hash of producer, dataset identity and shard size."""
    return cache_folder(cache_dir, "triples", dataset.name,
                        {"producer": s.producer(), "dataset": dataset.describe(), "shard_size": shard_size})


def parse_shard(dataset: Any, start: int, stop: int, path: str | Path, s: ParseSettings, shard_index: int,
                num_shards: int, progress: Callable[[int, int], None] | None = None) -> Path:
    """Parse captions ``dataset.captions[start:stop]`` and write them as one triple shard (atomically)."""
    caps = dataset.captions[start:stop]
    parsed = parse_captions([c.text for c in caps], [c.tokens for c in caps], s, progress,
                            desc=f"parse {Path(path).name}")
    for i, reason in parsed.failed.items():
        log.warning("caption %s of %s: %s; stored with no triples", caps[i].caption_id, dataset.source, reason)
    no_words = sum(1 for c in caps if not _WORD.search(c.text))
    if no_words:
        log.info("%s: %d caption(s) without a word (empty, whitespace, punctuation or emoji only) stored with no "
                 "triples", Path(path).name, no_words)
    return write_triple_shard(
        path, caption_ids=[c.caption_id for c in caps], image_ids=[c.image_id for c in caps],
        texts=[c.text for c in caps], triples=parsed.triples, num_tokens=parsed.num_tokens,
        truncated=parsed.truncated, failed_ids=[caps[i].caption_id for i in sorted(parsed.failed)],
        failed_reasons=[parsed.failed[i] for i in sorted(parsed.failed)], producer=s.producer(),
        dataset=dataset.describe(), shard_index=shard_index, num_shards=num_shards)
