"""Detector backends behind one small interface.

A backend turns a batch of RGB images into, per image, the top detections (after the detector's own NMS) and
one feature vector per detection plus one for the whole image, all pooled from the same backbone pass:

    det = build_detector("torchvision-mobilenet-v3-fpn", weights="random", device="cpu", seed=0)
    det.describe()            # what produced the features: goes into every shard (and the cache key)
    det.extract([img, ...])   # img: (3, h, w) float RGB in [0, 1]  ->  [RegionResult, ...]

Names: ``torchvision-r50-fpn-v2`` (default), ``torchvision-r50-fpn``, ``torchvision-mobilenet-v3-fpn``, and
``detectron2:<model-zoo config name or .yaml path>``. Weights: ``pretrained`` (the library's own COCO
weights through its own download cache), a local file (its sha256 is recorded), or ``random`` (seeded).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import file_sha256  # noqa: F401 - part of this module's API
from ..network import reachable

DEFAULT_DETECTOR = "torchvision-r50-fpn-v2"
MAX_DETECTIONS = 19  # the paper: 19 detections + the whole image = 20 fragments


class DetectorError(RuntimeError):
    """A detector cannot be built or run as asked; the message says what to change."""


@dataclass
class RegionResult:
    """One image's detections, in the pixels of the tensor given to ``extract``, by descending score."""

    boxes: torch.Tensor  # (n, 4) float32 xyxy, n <= MAX_DETECTIONS
    scores: torch.Tensor  # (n,) float32
    labels: torch.Tensor  # (n,) int64, the detector's class ids
    features: torch.Tensor  # (n, D) box-head features of the boxes above
    whole: torch.Tensor  # (D,) box-head feature of the whole image box


class Detector:
    """The interface every backend implements."""

    feature_dim: int

    def describe(self) -> dict[str, Any]:
        """Everything about the detector that changes its output (backend, config, weights identity, sizes)."""
        raise NotImplementedError

    def extract(self, images: list[torch.Tensor]) -> list[RegionResult]:
        """Detections and their features for a batch of (3, h, w) RGB tensors in [0, 1]; one backbone pass."""
        raise NotImplementedError

    def forward_bare(self, images: list[torch.Tensor]) -> list[Any]:
        """The library's own stock inference on the same inputs (for benchmarks: the cost to compare against)."""
        raise NotImplementedError


def results_in_input_pixels(chosen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pooled: torch.Tensor,
                            images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[RegionResult]:
    """Per image: (boxes, scores, labels) chosen in resized pixels and the pooled rows (its boxes, then the whole
    image) -> RegionResult with boxes in the pixels of the tensor the caller gave."""
    out = []
    for (b, s, c), f, im, (h, w) in zip(chosen, pooled.split([len(x[0]) + 1 for x in chosen]), images, sizes):
        ratio = torch.tensor([im.shape[2] / w, im.shape[1] / h] * 2, device=b.device)
        out.append(RegionResult(boxes=(b * ratio).float(), scores=s.float(), labels=c.long(),
                                features=f[:-1], whole=f[-1]))
    return out


def by_group(keys: list, run) -> list:
    """Call ``run(indices)`` once per distinct key (in first-seen order) and return its results in input order.

    Backends group a batch by padded input size: a batch tensor pads every image to the largest one, and the
    padding changes features (globally so in MobileNet-v3, whose squeeze-excite layers average over the whole
    map). Grouping equal sizes keeps every image's features independent of what it was batched with.
    """
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out: list = [None] * len(keys)
    for idx in groups.values():
        for i, r in zip(idx, run(idx)):
            out[i] = r
    return out


def _backend(name: str):
    if name.startswith("detectron2:"):
        from . import detectron2_backend

        return detectron2_backend
    from . import torchvision_backend

    if name not in torchvision_backend.MODELS:
        known = ", ".join(sorted(torchvision_backend.MODELS)) + ", detectron2:<config>"
        raise DetectorError(f"unknown detector {name!r}; choose one of: {known}")
    return torchvision_backend


def describe_detector(name: str = DEFAULT_DETECTOR, weights: str = "pretrained", seed: int = 0, *,
                      min_size: int = 0, max_size: int = 0, amp: bool = False) -> dict[str, Any]:
    """What ``build_detector(...).describe()`` will return, without building the model (cheap: cache keys)."""
    return _backend(name).describe(name, weights, seed, min_size=min_size, max_size=max_size, amp=amp)


def require_weights(name: str = DEFAULT_DETECTOR, weights: str = "pretrained") -> None:
    """Raise DetectorError, naming the fix, unless the weights are present or can be downloaded now (seconds)."""
    _backend(name).require_weights(name, weights)


def build_detector(name: str = DEFAULT_DETECTOR, weights: str = "pretrained", device: str = "cpu", seed: int = 0,
                   *, min_size: int = 0, max_size: int = 0, amp: bool = False) -> Detector:
    """Build a detector in eval mode on ``device``. ``min_size``/``max_size`` 0 keep the detector's own input size."""
    if amp and not str(device).startswith("cuda"):
        raise DetectorError("--amp needs a CUDA device (mixed precision is float16 autocast on the GPU)")
    return _backend(name).build(name, weights, device, seed, min_size=min_size, max_size=max_size, amp=amp)


# ------------------------------------------------------------------------------------------ weights helpers

def weights_kind(weights: str) -> str:
    """``pretrained``, ``random`` or ``file`` (a path that must exist)."""
    if weights in ("pretrained", "random"):
        return weights
    if not Path(weights).is_file():
        raise DetectorError(f"--detector-weights {weights!r}: no such file; give a weights file path, "
                            "'pretrained' or 'random'")
    return "file"


def weights_identity(weights: str, seed: int, pretrained_id: str) -> dict[str, Any]:
    kind = weights_kind(weights)
    if kind == "pretrained":
        return {"weights": "pretrained", "weights_id": pretrained_id}
    if kind == "random":
        return {"weights": "random", "seed": int(seed)}
    return {"weights": "file", "weights_sha256": file_sha256(weights)}


def require_download(url: str, cached: Path, timeout: float = 4.0) -> None:
    """Fail within seconds when pretrained weights are neither cached nor reachable (no retries, no hang)."""
    if cached.is_file():
        return
    host = url.split("/")[2]
    ok, why = reachable(host, timeout)
    if not ok:
        raise DetectorError(
            f"pretrained weights are not in the local cache ({cached}) and {host} cannot be reached ({why}). "
            "Offline, pass --detector-weights PATH (a local weights file) or --detector-weights random "
            f"(or copy the file to {cached}).")


def hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
