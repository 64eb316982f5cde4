"""torchvision Faster R-CNN as a region extractor: one backbone pass gives the detections and their features.

    images  -> model.transform, one image at a time (resize to min_size/max_size, normalise, pad to /32)
            -> batched by equal padded size (see detectors.by_group)
            -> model.backbone (FPN feature maps)  -> model.rpn (proposals, resized pixels)
            -> roi_heads.box_roi_pool + box_head (1024-d per proposal) -> box_predictor (class logits, deltas)
            -> select_detections (per-class NMS, one detection per proposal, top k)
            -> box_roi_pool + box_head again on the k final boxes + the whole-image box (1024-d each)
            -> boxes scaled back to the input pixels.
Nothing here touches the network unless weights are ``pretrained`` (torch.hub's cache, checked first).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torchvision.models import detection
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

from . import (by_group, Detector, DetectorError, hub_checkpoint, MAX_DETECTIONS, RegionResult, require_download,
               results_in_input_pixels, weights_identity, weights_kind)
from .calibrate import calibrate_normalisation
from .select import select_detections

log = logging.getLogger(__name__)

# name -> (builder, weights enum). Every torchvision Faster R-CNN box head ends in a 1024-d layer.
MODELS = {
    "torchvision-r50-fpn-v2": ("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
    "torchvision-r50-fpn": ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"),
    "torchvision-mobilenet-v3-fpn": ("fasterrcnn_mobilenet_v3_large_fpn", "FasterRCNN_MobileNet_V3_Large_FPN_Weights"),
}
FEATURE_DIM = 1024
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333  # GeneralizedRCNNTransform's defaults for these builders


def _weights_enum(name: str):
    return getattr(detection, MODELS[name][1]).DEFAULT


def describe(name: str, weights: str, seed: int, *, min_size: int = 0, max_size: int = 0,
             amp: bool = False) -> dict[str, Any]:
    builder, _ = MODELS[name]
    w = _weights_enum(name)
    out = {"backend": "torchvision", "detector": name, "model": builder,
           "min_size": min_size or DEFAULT_MIN_SIZE, "max_size": max_size or DEFAULT_MAX_SIZE,
           "feature_dim": FEATURE_DIM, "max_detections": MAX_DETECTIONS, "score_thresh": 0.0,
           "one_per_proposal": True, "amp": bool(amp)}
    out.update(weights_identity(weights, seed, f"{w} ({w.url.rsplit('/', 1)[-1]})"))
    return out


def require_weights(name: str, weights: str) -> None:
    """Raise DetectorError (naming the fix) unless the weights are here or can be downloaded now."""
    if weights_kind(weights) == "pretrained":
        w = _weights_enum(name)
        require_download(w.url, hub_checkpoint(w.url))


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise DetectorError(f"--detector-weights {path}: cannot be read as a PyTorch state dict ({e})") from None
    for key in ("model", "state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DetectorError(f"--detector-weights {path}: expected a state dict (name -> tensor)")
    return obj


def build(name: str, weights: str, device: str, seed: int, *, min_size: int = 0, max_size: int = 0,
          amp: bool = False) -> "TorchvisionDetector":
    builder = getattr(detection, MODELS[name][0])
    kwargs = {"min_size": min_size or DEFAULT_MIN_SIZE, "max_size": max_size or DEFAULT_MAX_SIZE}
    kind = weights_kind(weights)
    if kind == "pretrained":
        require_weights(name, weights)
        model = builder(weights=_weights_enum(name), **kwargs)
    elif kind == "random":
        with torch.random.fork_rng(devices=[]):  # same seed -> same weights, global RNG left alone
            torch.manual_seed(seed)
            model = builder(weights=None, weights_backbone=None, **kwargs)
            calibrate_normalisation(model, _calibration_pass(model))
    else:
        state = _load_state_dict(weights)
        cls = state.get("roi_heads.box_predictor.cls_score.weight")
        num_classes = int(cls.shape[0]) if cls is not None else 91
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Pretrained checkpoints use FrozenBatchNorm2d (no num_batches_tracked); eval-mode BatchNorm2d is the same.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise DetectorError(f"--detector-weights {weights} does not fit {name}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]} (is it a {MODELS[name][0]} state dict?)")
    model.eval().to(device)
    desc = describe(name, weights, seed, min_size=min_size, max_size=max_size, amp=amp)
    return TorchvisionDetector(model, desc, torch.device(device), amp)


def _calibration_pass(model: torch.nn.Module):
    """What calibrate_normalisation runs: noise images through the backbone, RPN and box head."""
    def run(imgs: torch.Tensor) -> None:
        batch, _ = model.transform(list(imgs))
        feats = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, feats)
        rh = model.roi_heads
        rh.box_head(rh.box_roi_pool(feats, proposals, batch.image_sizes))
    return run


class TorchvisionDetector(Detector):
    feature_dim = FEATURE_DIM

    def __init__(self, model: torch.nn.Module, description: dict[str, Any], device: torch.device, amp: bool):
        self.model = model
        self.device = device
        self.amp = amp
        self._description = description

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _pool(self, feats: dict[str, torch.Tensor], boxes: list[torch.Tensor], sizes) -> torch.Tensor:
        """Box-head features of ``boxes`` (resized pixels): (sum of boxes, 1024)."""
        rh = self.model.roi_heads
        return rh.box_head(rh.box_roi_pool(feats, boxes, sizes))

    @torch.inference_mode()
    def extract(self, images: list[torch.Tensor]) -> list[RegionResult]:
        imgs = [im.to(self.device, non_blocking=True) for im in images]
        with self._autocast():
            singles = [self.model.transform([im])[0] for im in imgs]  # resized + normalised + padded, one each
        return by_group([tuple(s.tensors.shape) for s in singles],
                        lambda idx: self._extract_same_size([imgs[i] for i in idx], [singles[i] for i in idx]))

    def _extract_same_size(self, imgs: list[torch.Tensor], singles: list[ImageList]) -> list[RegionResult]:
        """One backbone pass over images whose padded inputs have the same shape (so nothing extra is padded)."""
        model, rh = self.model, self.model.roi_heads
        batch = ImageList(torch.cat([s.tensors for s in singles]), [s.image_sizes[0] for s in singles])
        with self._autocast():
            feats = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, feats)  # [(P_i, 4)] in resized pixels
            logits, deltas = rh.box_predictor(self._pool(feats, proposals, batch.image_sizes))
        pred_boxes = rh.box_coder.decode(deltas.float(), proposals)  # (sum P_i, classes, 4)
        probs = torch.softmax(logits.float(), -1)  # (sum P_i, classes); column 0 is background
        counts = [len(p) for p in proposals]
        finals, chosen = [], []
        for bx, pr, (h, w) in zip(pred_boxes.split(counts), probs.split(counts), batch.image_sizes):
            bx = box_ops.clip_boxes_to_image(bx, (h, w))
            b, s, c, _ = select_detections(bx[:, 1:], pr[:, 1:], MAX_DETECTIONS, rh.nms_thresh)
            chosen.append((b, s, c + 1))
            whole = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=b.device)
            finals.append(torch.cat([b, whole]))  # (n_i + 1, 4): detections, then the whole image
        with self._autocast():
            pooled = self._pool(feats, finals, batch.image_sizes).float()  # (sum n_i + 1, 1024)
        return results_in_input_pixels(chosen, pooled, imgs, batch.image_sizes)

    @torch.inference_mode()
    def forward_bare(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with self._autocast():
            return self.model([im.to(self.device, non_blocking=True) for im in images])


__all__ = ["MODELS", "FEATURE_DIM", "describe", "build", "TorchvisionDetector"]
