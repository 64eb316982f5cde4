"""Preflight: check everything a command will need before it does any work, and name every problem at once.

Every Luigi command runs these checks for the part of its graph that is not yet complete (tasks.py), so an
offline first run fails in seconds with one message listing each fix, having written nothing. The same checks
as a plain command:

    python -m pipeline.doctor --dataset demo                       # the main job's needs, default settings
    python -m pipeline.doctor --dataset demo --detector-weights random \\
        --stanza-tagger tests/stanza_models/en_ewt_tagger_small.pt \\
        --stanza-parser tests/stanza_models/en_ewt_parser_small.pt

A check is a function that returns quietly or raises an exception whose message says what to do (the same
errors the stages raise themselves: DatasetError, DetectorError, StanzaModelsMissing, ...).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

Check = Callable[[], None]

# Estimated bytes per cached item (features dominate: 20 rows x D values; captions: text and ~10 triples).
REGION_ROW_OVERHEAD = 4 * 4 + 4 + 4 + 1  # box, score, label, mask
TRIPLE_BYTES_PER_CAPTION = 2048


class PreflightError(RuntimeError):
    """Something a command needs is missing; the message lists every problem with its fix."""


def dataset_check(dataset: str, image_root: str = "", load: Callable[[], Any] | None = None) -> Check:
    """The dataset reads (``load``: the caller's cached reader)."""
    def check() -> None:
        from data import load_dataset

        load() if load else load_dataset(dataset, image_root or None)
    return check


def images_check(dataset: str, image_root: str = "", load: Callable[[], Any] | None = None) -> Check:
    """The dataset's image folder exists (a detector reads the images; an unreadable dataset is another check's)."""
    def check() -> None:
        from data import load_dataset

        try:
            ds = load() if load else load_dataset(dataset, image_root or None)
        except Exception:  # noqa: BLE001 - reported by dataset_check
            return
        if not Path(ds.image_root).is_dir():
            raise FileNotFoundError(f"image folder {ds.image_root} of dataset {dataset} does not exist: give the "
                                    "folder the dataset's image paths are relative to with --image-root")
        # A folder holding none of the images is the wrong folder: extracting would only record every image as
        # missing. Some missing images are the shards' business (each is recorded on its own).
        if ds.images and not any(ds.image_path(im.image_id).is_file() for im in ds.images):
            first = ds.images[0]
            raise FileNotFoundError(f"none of the {len(ds.images)} images of dataset {dataset} is in the image "
                                    f"folder {ds.image_root} (the first, {first.path!r}, would be "
                                    f"{ds.image_path(first.image_id)}): give the folder the dataset's image paths "
                                    "are relative to with --image-root")
    return check


def detector_check(detector: str, weights: str) -> Check:
    """A detector's weights are here or downloadable now; a feature source (butd-tsv:, precomp:) has none."""
    def check() -> None:
        from .detectors import require_weights
        from .sources import is_source

        if is_source(detector):
            from .sources import describe_source

            describe_source(detector)  # its files exist and hold a readable row
        else:
            require_weights(detector, weights)
    return check


def stanza_check(settings: Any) -> Check:
    def check() -> None:
        from .parse import require_models

        require_models(settings)
    return check


def _existing_parent(folder: Path) -> Path:
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_check(folder: str | Path, role: str, option: str, need_bytes: int | Callable[[], int] = 0) -> Check:
    """The folder (or the nearest existing folder above it) is a writable folder with ``need_bytes`` free
    (a number, or a function estimating it; one that fails counts as 0: its cause is another check's)."""
    def check() -> None:
        need = need_bytes
        if callable(need):
            try:
                need = need()
            except Exception:  # noqa: BLE001 - e.g. an unreadable dataset, reported by the dataset check
                need = 0
        target = Path(folder)
        base = _existing_parent(target)
        if not base.is_dir():
            raise NotADirectoryError(f"{role} {target}: {base} is a file, not a folder; choose another with {option}")
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"{role} {target}: {base} is not writable; choose a writable folder with {option} "
                                  "or change its permissions")
        free = shutil.disk_usage(base).free
        if need and free < need:
            raise OSError(f"{role} {target}: about {need / 1e9:.2f} GB needed but {free / 1e9:.2f} GB free on "
                          f"{base}; free space or choose another folder with {option}")
    return check


def region_cache_bytes(n_images: int, feature_dim: int, feature_dtype: str) -> int:
    return n_images * 20 * (feature_dim * (2 if feature_dtype == "float16" else 4) + REGION_ROW_OVERHEAD)


def triple_cache_bytes(n_captions: int) -> int:
    return n_captions * TRIPLE_BYTES_PER_CAPTION


def run_checks(checks: Mapping[Any, Check]) -> list[str]:
    """Run every check (none stops the others); the problems' messages, in order, each once (two tasks may
    check one folder under different keys)."""
    problems = []
    for check in checks.values():
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is a problem to report, each names its fix
            text = f"{type(e).__name__}: {e}"
            if text not in problems:
                problems.append(text)
    return problems


def bound_check(option: str, value: float, rule: str) -> Check:
    """An option within its bound (``">= 1"``, ``"> 0"``; NaN is within none); ``option`` as the user names it."""
    def check() -> None:
        op, limit = rule.split()
        if not (value >= float(limit) if op == ">=" else value > float(limit)):
            raise ValueError(f"{option} {value}: must be {rule}")
    return check


def finite_check(option: str, value: float) -> Check:
    def check() -> None:
        if not math.isfinite(value):
            raise ValueError(f"{option} {value}: must be a finite number")
    return check


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(\d+)|mps)$")


def device_check(device: str) -> Check:
    """The device is one torch knows by that name, and exists here."""
    def check() -> None:
        m = _DEVICE.match(device or "auto")
        if not m:
            raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N")
        if not device.startswith(("cuda", "mps")):
            return
        import torch

        if device == "mps":
            if not torch.backends.mps.is_available():
                raise RuntimeError("--device mps: no Apple GPU is available here; use --device cpu or auto")
            return
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
        index = int(m.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                               "(cuda:0 ...); choose one of them or --device auto")
    return check


def report(problems: list[str]) -> str:
    n = len(problems)
    lines = [f"preflight found {n} problem{'s' if n > 1 else ''}; nothing was run or written. Fix "
             f"{'each' if n > 1 else 'it'} and run the same command again:"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
    return "\n".join(lines)


def require(checks: Mapping[Any, Check]) -> None:
    """Raise PreflightError listing every problem, or return quietly."""
    problems = run_checks(checks)
    if problems:
        raise PreflightError(report(problems))


def main_job_checks(dataset: str = "demo", image_root: str = "", cache_dir: str = "cache", run_dir: str = "runs",
                    detector: str = "torchvision-r50-fpn-v2", detector_weights: str = "pretrained",
                    feature_dtype: str = "float16", parse: Any = None) -> dict[Any, Check]:
    """What extraction, parsing and training of a dataset need (the main job's graph, nothing done yet)."""
    from .parse import ParseSettings

    checks: dict[Any, Check] = {"dataset": dataset_check(dataset, image_root),
                                "images": images_check(dataset, image_root),
                                "detector": detector_check(detector, detector_weights),
                                "stanza": stanza_check(parse or ParseSettings())}
    try:
        from data import load_dataset

        ds = load_dataset(dataset, image_root or None)
        need = (region_cache_bytes(len(ds.images), 1024, feature_dtype) + triple_cache_bytes(len(ds.captions)))
    except Exception:  # noqa: BLE001 - the dataset check reports it
        need = 0
    checks["cache"] = folder_check(cache_dir, "cache folder", "--cache-dir", need)
    checks["runs"] = folder_check(run_dir, "runs folder", "--run-dir")
    return checks


def main(argv: list[str] | None = None) -> int:
    from .parse import ParseSettings

    p = argparse.ArgumentParser(prog="python -m pipeline.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="demo")
    p.add_argument("--image-root", default="")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--run-dir", default="runs")
    p.add_argument("--detector", default="torchvision-r50-fpn-v2")
    p.add_argument("--detector-weights", default="pretrained")
    p.add_argument("--feature-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--stanza-dir", default="")
    p.add_argument("--stanza-package", default="default")
    p.add_argument("--stanza-tagger", default="")
    p.add_argument("--stanza-parser", default="")
    a = p.parse_args(argv)
    try:
        parse = ParseSettings(package=a.stanza_package, stanza_dir=a.stanza_dir, tagger=a.stanza_tagger,
                              parser=a.stanza_parser)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = run_checks(main_job_checks(a.dataset, a.image_root, a.cache_dir, a.run_dir, a.detector,
                                          a.detector_weights, a.feature_dtype, parse))
    if problems:
        print(report(problems).replace("; nothing was run or written. Fix", ". Fix"), file=sys.stderr)
        return 2
    print(f"everything {a.dataset} needs is in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
