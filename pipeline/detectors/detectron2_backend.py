"""detectron2 Faster R-CNN as a region extractor (thin; detectron2 is imported only when asked for).

Written against detectron2's documented model API (v0.6 / main): ``model.preprocess_image``,
``model.backbone``, ``model.proposal_generator``, the ROI heads' pooling and box head (``Res5ROIHeads``: C4,
2048-d; ``StandardROIHeads``: FPN, 1024-d), ``box_predictor.predict_boxes`` / ``predict_probs`` (the two halves
of ``box_predictor.inference``), then the same ``select_detections`` as the torchvision backend.
Not tested in defrag's CI: detectron2 is built from source and is not installed there.

Names: ``detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml`` (a model-zoo config) or
``detectron2:/path/to/config.yaml`` (a local config; with ``pretrained`` its MODEL.WEIGHTS is loaded).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import (by_group, Detector, DetectorError, MAX_DETECTIONS, RegionResult, require_download,
               results_in_input_pixels, weights_identity, weights_kind)
from .select import select_detections

INSTALL = ("pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
           "(after torch; see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)")


def _import():
    try:
        from detectron2 import model_zoo
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data.transforms import ResizeShortestEdge
        from detectron2.modeling import build_model
        from detectron2.structures import Boxes, ImageList
    except ImportError as e:
        raise DetectorError(f"detectron2 detectors need detectron2, which is not installed ({e}). Install it "
                            f"with: {INSTALL}") from None
    return model_zoo, DetectionCheckpointer, get_cfg, ResizeShortestEdge, build_model, Boxes, ImageList


def _config(name: str, min_size: int, max_size: int):
    model_zoo, _, get_cfg, *_ = _import()
    spec = name.split(":", 1)[1]
    cfg = get_cfg()
    if Path(spec).is_file():
        cfg.merge_from_file(spec)
        url = cfg.MODEL.WEIGHTS
    else:
        try:
            cfg.merge_from_file(model_zoo.get_config_file(spec))
            url = model_zoo.get_checkpoint_url(spec)
        except RuntimeError as e:
            raise DetectorError(f"detector {name!r}: {e}") from None
    if min_size:
        cfg.INPUT.MIN_SIZE_TEST = min_size
    if max_size:
        cfg.INPUT.MAX_SIZE_TEST = max_size
    return cfg, url


def _feature_dim(cfg) -> int:
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":  # C4: res5 output, mean-pooled
        return int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8
    return int(cfg.MODEL.ROI_BOX_HEAD.FC_DIM)


def describe(name: str, weights: str, seed: int, *, min_size: int = 0, max_size: int = 0,
             amp: bool = False) -> dict[str, Any]:
    cfg, url = _config(name, min_size, max_size)
    out = {"backend": "detectron2", "detector": name, "model": name.split(":", 1)[1],
           "roi_heads": cfg.MODEL.ROI_HEADS.NAME, "min_size": int(cfg.INPUT.MIN_SIZE_TEST),
           "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "input_format": cfg.INPUT.FORMAT,
           "feature_dim": _feature_dim(cfg), "max_detections": MAX_DETECTIONS, "score_thresh": 0.0,
           "one_per_proposal": True, "amp": bool(amp)}
    out.update(weights_identity(weights, seed, str(url)))
    return out


def build(name: str, weights: str, device: str, seed: int, *, min_size: int = 0, max_size: int = 0,
          amp: bool = False) -> "Detectron2Detector":
    _, DetectionCheckpointer, _, _, build_model, _, _ = _import()
    cfg, url = _config(name, min_size, max_size)
    cfg.MODEL.DEVICE = str(device)
    kind = weights_kind(weights)
    with torch.random.fork_rng(devices=[]):  # same seed -> same weights for "random"
        torch.manual_seed(seed)
        model = build_model(cfg)
    if kind != "random":
        DetectionCheckpointer(model).load(require_weights(name, weights, url))
    model.eval()
    return Detectron2Detector(model, cfg, describe(name, weights, seed, min_size=min_size, max_size=max_size,
                                                   amp=amp), amp)


def require_weights(name: str, weights: str, url: str | None = None) -> str:
    """The weights' path or URL; raises DetectorError (naming the fix) unless they are here or downloadable now."""
    kind = weights_kind(weights)
    if kind == "random":
        return ""
    if url is None:
        _, url = _config(name, 0, 0)
    if kind == "pretrained" and not url:
        raise DetectorError(f"detector {name!r}: the config names no MODEL.WEIGHTS to use as 'pretrained'; pass "
                            "--detector-weights PATH or --detector-weights random")
    path = str(url) if kind == "pretrained" else weights
    if path.startswith(("http://", "https://", "detectron2://")):
        _require_cached_or_online(path)
    return path


def _require_cached_or_online(url: str) -> None:
    """detectron2 downloads through iopath into <cache>/<url path>: offline, fail at once unless it is there."""
    from iopath.common.file_io import get_cache_dir

    url = url.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
    require_download(url, Path(get_cache_dir()) / url.split("://", 1)[1].split("/", 1)[1])


class Detectron2Detector(Detector):
    def __init__(self, model, cfg, description: dict[str, Any], amp: bool):
        _, _, _, self._resize, _, self._boxes, self._image_list = _import()
        self.model = model
        self.cfg = cfg
        self.amp = amp
        self.feature_dim = description["feature_dim"]
        self._description = description

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def _inputs(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """RGB [0, 1] tensors -> detectron2's inputs: resized (shortest edge), 0..255, in cfg.INPUT.FORMAT."""
        out = []
        for im in images:
            h, w = im.shape[1:]
            nh, nw = self._resize.get_output_shape(h, w, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST)
            x = F.interpolate(im[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0] * 255.0
            if self.cfg.INPUT.FORMAT == "BGR":
                x = x.flip(0)
            out.append({"image": x.to(self.model.device), "height": h, "width": w})
        return out

    def _box_features(self, features: dict[str, torch.Tensor], boxes: list) -> torch.Tensor:
        """Per-box features from the ROI heads' own pooling: (sum boxes, D)."""
        rh = self.model.roi_heads
        if hasattr(rh, "_shared_roi_transform"):  # Res5ROIHeads (C4)
            x = rh._shared_roi_transform([features[f] for f in rh.in_features], boxes)
            return x.mean(dim=[2, 3])
        return rh.box_head(rh.box_pooler([features[f] for f in rh.box_in_features], boxes))

    @torch.inference_mode()
    def extract(self, images: list[torch.Tensor]) -> list[RegionResult]:
        inputs = self._inputs(images)
        with self._autocast():
            singles = [self.model.preprocess_image([x]) for x in inputs]  # normalised + padded, one each
        return by_group([tuple(s.tensor.shape) for s in singles],
                        lambda idx: self._extract_same_size([images[i] for i in idx], [singles[i] for i in idx]))

    def _extract_same_size(self, images: list[torch.Tensor], singles: list) -> list[RegionResult]:
        """One backbone pass over images whose padded inputs have the same shape (see detectors.by_group)."""
        model, rh = self.model, self.model.roi_heads
        batch = self._image_list(torch.cat([s.tensor for s in singles]), [s.image_sizes[0] for s in singles])
        with self._autocast():
            features = model.backbone(batch.tensor)
            proposals, _ = model.proposal_generator(batch, features, None)
            predictions = rh.box_predictor(self._box_features(features, [p.proposal_boxes for p in proposals]))
        predictions = tuple(p.float() for p in predictions)
        all_boxes = rh.box_predictor.predict_boxes(predictions, proposals)  # per image (P, C*4) or (P, 4)
        all_probs = rh.box_predictor.predict_probs(predictions, proposals)  # per image (P, C+1), background last
        chosen, finals = [], []
        for bx, pr, (h, w) in zip(all_boxes, all_probs, batch.image_sizes):
            num_c = pr.shape[1] - 1
            bx = bx.reshape(len(pr), -1, 4).expand(-1, num_c, 4)  # class-agnostic regression: one box for all
            bx = torch.stack([bx[..., 0].clamp(0, w), bx[..., 1].clamp(0, h), bx[..., 2].clamp(0, w),
                              bx[..., 3].clamp(0, h)], dim=-1)
            b, s, c, _ = select_detections(bx, pr[:, :num_c], MAX_DETECTIONS,
                                          rh.box_predictor.test_nms_thresh)
            chosen.append((b, s, c))
            whole = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=b.device)
            finals.append(self._boxes(torch.cat([b, whole])))
        with self._autocast():
            pooled = self._box_features(features, finals).float()
        return results_in_input_pixels(chosen, pooled, images, batch.image_sizes)

    @torch.inference_mode()
    def forward_bare(self, images: list[torch.Tensor]) -> list[Any]:
        with self._autocast():
            return self.model(self._inputs(images))
