"""detectron2 Faster R-CNN as a region extractor (thin; detectron2 is imported only when asked for).

    images (RGB [0, 1])  -> uint8 in cfg.INPUT.FORMAT, ResizeShortestEdge with PIL bilinear (DefaultPredictor's input)
        -> model.preprocess_image, one image at a time (normalise, pad), batched by equal padded size
        -> model.backbone -> model.proposal_generator (RPN proposals, resized pixels)
        -> ROI pooling + box head (StandardROIHeads: FPN/DC5, 1024-d) or res5 + mean (Res5ROIHeads: C4, 2048-d)
        -> box_predictor.predict_boxes / predict_probs (the two halves of box_predictor.inference)
        -> select_detections (per-class NMS, score threshold 0, nonempty boxes, one per proposal, top 19)
        -> the same pooling on the final boxes + the whole-image box.

Supported models: ``SUPPORTED`` below, checked from the config before anything is built.
Names: ``detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml`` (a model-zoo config) or
``detectron2:path/to/config.yaml`` (a local config, identified by the content of it and its ``_BASE_`` chain).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import (by_group, Detector, DetectorError, file_sha256, MAX_DETECTIONS, RegionResult, require_download,
               results_in_input_pixels, weights_identity, weights_kind)
from .calibrate import calibrate_normalisation
from .select import select_detections

log = logging.getLogger(__name__)

INSTALL = ("pip install 'setuptools<82' && pip install --no-build-isolation "
           "'git+https://github.com/facebookresearch/detectron2.git' (after torch; needs the network and a C++ "
           "compiler; offline, build a wheel where there is network with `pip wheel --no-build-isolation --no-deps "
           "<detectron2 source>` and pip install that file with 'setuptools<82')")
ROI_HEADS = ("StandardROIHeads", "Res5ROIHeads")
SUPPORTED = ("supported: YAML configs of GeneralizedRCNN with PROPOSAL_GENERATOR RPN and ROI_HEADS StandardROIHeads "
             "(FPN, DC5; mask/keypoint configs use their box branch) or Res5ROIHeads (C4), e.g. "
             "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml, COCO-Detection/faster_rcnn_R_101_C4_3x.yaml")
CALIBRATION_PROPOSALS = 8  # proposals per noise image through the box head when calibrating (res5 is costly)


def _import() -> SimpleNamespace:
    """detectron2's pieces, or a DetectorError that names the real cause and a command that fixes it."""
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        if e.name == "detectron2":
            raise DetectorError(f"detectron2 detectors need detectron2, which is not installed. Install it: "
                                f"{INSTALL}") from None
        raise DetectorError(f"detectron2 is installed but cannot be imported: {e}. Reinstall it: {INSTALL}") from None
    try:
        from detectron2 import model_zoo
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data.transforms import NoOpTransform, ResizeShortestEdge, ResizeTransform
        from detectron2.modeling import build_model
        from detectron2.structures import Boxes, ImageList
    except ImportError as e:
        if e.name == "pkg_resources":
            raise DetectorError("detectron2 is installed but cannot be imported: No module named 'pkg_resources' "
                                "(detectron2.model_zoo needs it and setuptools 82 removed it). Fix: pip install "
                                "'setuptools<82'") from None
        raise DetectorError(f"detectron2 is installed but cannot be imported: {type(e).__name__}: {e}. It must be "
                            f"built against the installed torch {torch.__version__}; rebuild it: {INSTALL}") from None

    class RecordingCheckpointer(DetectionCheckpointer):
        """DetectionCheckpointer that keeps what it could not load (the stock one only logs it)."""

        incompatible = None

        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    return SimpleNamespace(model_zoo=model_zoo, Checkpointer=RecordingCheckpointer, get_cfg=get_cfg,
                           NoOpTransform=NoOpTransform, ResizeShortestEdge=ResizeShortestEdge,
                           ResizeTransform=ResizeTransform, build_model=build_model, Boxes=Boxes, ImageList=ImageList)


# ------------------------------------------------------------------------------------------ config

def _local_config(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.is_file() else None


def config_sha256(path: str | Path) -> str:
    """sha256 over a YAML config and its ``_BASE_`` chain (bytes of each file, nearest first)."""
    h = hashlib.sha256()
    path, seen = Path(path), set()
    while path is not None and path.resolve() not in seen:
        seen.add(path.resolve())
        data = path.read_bytes()
        h.update(hashlib.sha256(data).digest())
        m = re.search(rb"^_BASE_\s*:\s*[\"']?([^\"'#\s]+)", data, re.M)
        if not m:
            break
        base = m.group(1).decode()
        if base.startswith(("http://", "https://")):
            h.update(base.encode())
            break
        base_path = Path(base).expanduser()
        child, path = path, base_path if base_path.is_absolute() else path.parent / base_path
        if not path.is_file():
            raise DetectorError(f"config {child}: its _BASE_ {base} is not a file ({path})")
    return h.hexdigest()


def _check_architecture(cfg, name: str) -> None:
    """Refuse, in one line, any model whose inference is not GeneralizedRCNN's RPN + one box head."""
    m = cfg.MODEL
    problem = None
    if m.META_ARCHITECTURE != "GeneralizedRCNN":
        problem = f"META_ARCHITECTURE {m.META_ARCHITECTURE}"
    elif m.PROPOSAL_GENERATOR.NAME != "RPN" or m.LOAD_PROPOSALS:
        problem = f"PROPOSAL_GENERATOR {m.PROPOSAL_GENERATOR.NAME} (precomputed or non-RPN proposals)"
    elif m.ROI_HEADS.NAME not in ROI_HEADS:
        why = " (its scores average several stages' heads)" if "Cascade" in m.ROI_HEADS.NAME else ""
        problem = f"ROI_HEADS {m.ROI_HEADS.NAME}{why}"
    elif m.ROI_HEADS.NAME == "StandardROIHeads" and (m.ROI_BOX_HEAD.NAME != "FastRCNNConvFCHead"
                                                     or m.ROI_BOX_HEAD.NUM_FC < 1):
        problem = f"ROI_BOX_HEAD {m.ROI_BOX_HEAD.NAME} with NUM_FC {m.ROI_BOX_HEAD.NUM_FC}"
    if problem:
        raise DetectorError(f"detector {name!r}: {problem} is not supported; {SUPPORTED}")


def _config(name: str, min_size: int, max_size: int):
    """(cfg, local config path or None). Checks the architecture; touches neither weights nor network."""
    d2 = _import()
    spec = name.split(":", 1)[1]
    if spec.endswith(".py"):
        raise DetectorError(f"detector {name!r}: LazyConfig (.py) files are not supported; {SUPPORTED}")
    local = _local_config(spec)
    cfg = d2.get_cfg()
    try:
        cfg.merge_from_file(str(local) if local else d2.model_zoo.get_config_file(spec))
    except RuntimeError as e:  # not in the model zoo
        raise DetectorError(f"detector {name!r}: {spec} is neither a file here nor a model-zoo config ({e})") from None
    except Exception as e:  # noqa: BLE001 - YAML syntax, unknown keys: all mean "fix this file"
        raise DetectorError(f"detector {name!r}: cannot read config {spec}: {type(e).__name__}: {e}") from None
    _check_architecture(cfg, name)
    if min_size:
        cfg.INPUT.MIN_SIZE_TEST = min_size
    if max_size:
        cfg.INPUT.MAX_SIZE_TEST = max_size
    return cfg, local


def _pretrained(name: str, cfg, local: Path | None) -> tuple[str, str]:
    """(what to load, its identity) for ``pretrained``: the zoo's checkpoint, or a local config's MODEL.WEIGHTS."""
    if local is None:
        spec = name.split(":", 1)[1]
        try:
            url = _import().model_zoo.get_checkpoint_url(spec)
        except RuntimeError:
            raise DetectorError(f"detector {name!r}: the model zoo publishes no weights for {spec}; pass "
                                "--detector-weights PATH or --detector-weights random") from None
        return url, url
    weights = str(cfg.MODEL.WEIGHTS)
    if not weights:
        raise DetectorError(f"detector {name!r}: the config names no MODEL.WEIGHTS to use as 'pretrained'; pass "
                            "--detector-weights PATH or --detector-weights random")
    if "ImageNetPretrained" in weights:
        raise DetectorError(f"detector {name!r}: the config's MODEL.WEIGHTS {weights} is an ImageNet backbone, not "
                            "a detector (its RPN and box heads would stay random); set MODEL.WEIGHTS to a trained "
                            "detector checkpoint, or pass --detector-weights PATH or --detector-weights random")
    if Path(weights).is_file():
        return weights, f"sha256:{file_sha256(weights)}"
    return weights, weights


def _feature_dim(cfg) -> int:
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":  # C4: res5 output, mean-pooled
        return int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8
    return int(cfg.MODEL.ROI_BOX_HEAD.FC_DIM)


def describe(name: str, weights: str, seed: int, *, min_size: int = 0, max_size: int = 0,
             amp: bool = False) -> dict[str, Any]:
    cfg, local = _config(name, min_size, max_size)
    model = {"model": name.split(":", 1)[1]} if local is None else {"model": "local config",
                                                                     "config_sha256": config_sha256(local)}
    out = {"backend": "detectron2", "detector": "detectron2:" + model["model"], **model,
           "roi_heads": cfg.MODEL.ROI_HEADS.NAME, "min_size": int(cfg.INPUT.MIN_SIZE_TEST),
           "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "input_format": cfg.INPUT.FORMAT,
           "feature_dim": _feature_dim(cfg), "max_detections": MAX_DETECTIONS, "score_thresh": 0.0,
           "one_per_proposal": True, "amp": bool(amp)}
    pretrained_id = _pretrained(name, cfg, local)[1] if weights_kind(weights) == "pretrained" else ""
    out.update(weights_identity(weights, seed, pretrained_id))
    return out


# ------------------------------------------------------------------------------------------ building

def build(name: str, weights: str, device: str, seed: int, *, min_size: int = 0, max_size: int = 0,
          amp: bool = False) -> "Detectron2Detector":
    d2 = _import()
    cfg, local = _config(name, min_size, max_size)
    description = describe(name, weights, seed, min_size=min_size, max_size=max_size, amp=amp)
    kind = weights_kind(weights)
    cfg.MODEL.DEVICE = "cpu"  # built and calibrated on the CPU: the same weights whatever the device
    with torch.random.fork_rng(devices=[]):  # same seed -> same weights for "random"
        torch.manual_seed(seed)
        model = d2.build_model(cfg).eval()
        if kind == "random":
            calibrate_normalisation(model, _calibration_pass(model, cfg.INPUT.FORMAT))
    if kind != "random":
        load_weights(model, require_weights(name, weights), name)
    rh = model.roi_heads
    got = rh.res5[-1].out_channels if hasattr(rh, "res5") else rh.box_head.output_shape.channels
    if got != description["feature_dim"]:
        raise DetectorError(f"detector {name!r}: its box features have {got} values, the config says "
                            f"{description['feature_dim']}: a defrag bug for this config")
    cfg.MODEL.DEVICE = str(device)
    model.to(device)
    return Detectron2Detector(model, cfg, description, amp)


def _calibration_pass(model, input_format: str):
    """What calibrate_normalisation runs: noise images through the backbone, RPN and box features."""
    def run(imgs: torch.Tensor) -> None:
        x = imgs * 255.0
        if input_format == "BGR":
            x = x.flip(1)
        images = model.preprocess_image([{"image": im} for im in x])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        box_features(model, features, [p.proposal_boxes[:CALIBRATION_PROPOSALS] for p in proposals])
    return run


# Not counted: FrozenBatchNorm fills running statistics missing from an old-format file with defaults.
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def load_weights(model, path: str, name: str) -> dict[str, tuple[int, int]]:
    """Load a detectron2 checkpoint (.pkl or .pth) and check it filled the detector.

    Returns {part: (tensors filled, tensors)} for backbone, proposal_generator and the box branch of
    roi_heads (weights and biases; running statistics are not counted). Raises DetectorError for a file that is not a checkpoint, or one that leaves any of those parts
    (at least partly) at its random initialisation, naming the numbers and examples.
    """
    checkpointer = _import().Checkpointer(model)
    try:
        checkpointer.load(path)
    except Exception as e:  # noqa: BLE001 - unpickling errors, wrong structure: all mean "not a checkpoint"
        raise DetectorError(f"weights {path}: cannot be read as a detectron2 checkpoint (a .pkl or .pth holding "
                            f"a state dict, optionally under 'model'): {type(e).__name__}: {e}") from None
    inc = checkpointer.incompatible
    not_loaded = set(inc.missing_keys) | {k for k, *_ in inc.incorrect_shapes}
    parts: dict[str, tuple[int, int]] = {}
    skipped: list[str] = []
    for key in model.state_dict():
        part = key.split(".", 1)[0]
        if part not in ("backbone", "proposal_generator", "roi_heads") or key.endswith(RUNNING_STATS):
            continue
        if part == "roi_heads" and key.split(".")[1] in ("mask_head", "keypoint_head"):
            continue  # masks and keypoints are never used here
        filled, total = parts.get(part, (0, 0))
        parts[part] = (filled + (key not in not_loaded), total + 1)
        if key in not_loaded:
            skipped.append(key)
    summary = ", ".join(f"{p} {f}/{t}" for p, (f, t) in parts.items())
    log.info("weights %s filled %s tensors of detector %s", path, summary, name)
    if skipped:
        shapes = "; ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in inc.incorrect_shapes[:3])
        raise DetectorError(
            f"weights {path} do not fill detector {name!r}: tensors filled per part: {summary}; "
            f"{len(skipped)} left random, e.g. {', '.join(skipped[:4])}"
            + (f"; shapes differ: {shapes}" if shapes else "")
            + ". Use the checkpoint trained with this config (a different class count needs "
              "MODEL.ROI_HEADS.NUM_CLASSES set in a local config)")
    return parts


def require_weights(name: str, weights: str) -> str:
    """The weights' path or URL ("" for random); raises DetectorError (naming the fix) unless they are here or
    downloadable now. Cheap: reads the config, builds nothing."""
    kind = weights_kind(weights)
    if kind == "random":
        return ""
    if kind == "file":
        return weights
    cfg, local = _config(name, 0, 0)
    path = _pretrained(name, cfg, local)[0]
    if path.startswith(("http://", "https://", "detectron2://")):
        _require_cached_or_online(path)
    return path


def _require_cached_or_online(url: str) -> None:
    """detectron2 downloads through iopath into <cache>/<url path>: offline, fail at once unless it is there."""
    from iopath.common.file_io import get_cache_dir

    url = url.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
    require_download(url, Path(get_cache_dir()) / url.split("://", 1)[1].split("/", 1)[1])


def box_features(model, features: dict[str, torch.Tensor], boxes: list) -> torch.Tensor:
    """Per-box features from the ROI heads' own pooling: (sum of boxes, D). ``boxes``: [Boxes] per image."""
    rh = model.roi_heads
    if hasattr(rh, "_shared_roi_transform"):  # Res5ROIHeads (C4): res5 on 14x14 pooled res4, mean over 7x7
        x = rh._shared_roi_transform([features[f] for f in rh.in_features], boxes)
        return x.mean(dim=[2, 3])
    return rh.box_head(rh.box_pooler([features[f] for f in rh.box_in_features], boxes))


# ------------------------------------------------------------------------------------------ extraction

class Detectron2Detector(Detector):
    def __init__(self, model, cfg, description: dict[str, Any], amp: bool):
        self._d2 = _import()
        self.model = model
        self.cfg = cfg
        self.amp = amp
        self.feature_dim = description["feature_dim"]
        self._description = description

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def _resize(self, h: int, w: int):
        """DefaultPredictor's ResizeShortestEdge (min = max = MIN_SIZE_TEST, 0 = no resize), without its RNG."""
        short = int(self.cfg.INPUT.MIN_SIZE_TEST)
        if short == 0:
            return self._d2.NoOpTransform()
        nh, nw = self._d2.ResizeShortestEdge.get_output_shape(h, w, short, int(self.cfg.INPUT.MAX_SIZE_TEST))
        return self._d2.ResizeTransform(h, w, nh, nw, self._d2.ResizeShortestEdge(short).interp)

    def inputs(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """RGB [0, 1] tensors -> detectron2's inputs exactly as DefaultPredictor makes them from the uint8 image:
        channels in cfg.INPUT.FORMAT, resized on uint8 with PIL bilinear, then float32 CHW."""
        out = []
        for im in images:
            h, w = im.shape[1:]
            arr = im.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (h, w, 3) RGB, exact
            if self.cfg.INPUT.FORMAT == "BGR":
                arr = arr[:, :, ::-1]
            arr = self._resize(h, w).apply_image(arr)
            x = torch.as_tensor(np.ascontiguousarray(arr).astype("float32").transpose(2, 0, 1))
            out.append({"image": x.to(self.model.device), "height": h, "width": w})
        return out

    @torch.inference_mode()
    def extract(self, images: list[torch.Tensor]) -> list[RegionResult]:
        inputs = self.inputs(images)
        with self._autocast():
            singles = [self.model.preprocess_image([x]) for x in inputs]  # normalised + padded, one each
        return by_group([tuple(s.tensor.shape) for s in singles],
                        lambda idx: self._extract_same_size([images[i] for i in idx], [singles[i] for i in idx]))

    def _extract_same_size(self, images: list[torch.Tensor], singles: list) -> list[RegionResult]:
        """One backbone pass over images whose padded inputs have the same shape (see detectors.by_group)."""
        model, rh = self.model, self.model.roi_heads
        batch = self._d2.ImageList(torch.cat([s.tensor for s in singles]), [s.image_sizes[0] for s in singles])
        with self._autocast():
            features = model.backbone(batch.tensor)
            proposals, _ = model.proposal_generator(batch, features, None)
            predictions = rh.box_predictor(box_features(model, features, [p.proposal_boxes for p in proposals]))
        predictions = tuple(p.float() for p in predictions)
        all_boxes = rh.box_predictor.predict_boxes(predictions, proposals)  # per image (P, C*4) or (P, 4)
        all_probs = rh.box_predictor.predict_probs(predictions, proposals)  # per image (P, C+1), background last
        chosen, finals = [], []
        for bx, pr, (h, w) in zip(all_boxes, all_probs, batch.image_sizes):
            finite = torch.isfinite(bx).all(dim=1) & torch.isfinite(pr).all(dim=1)  # detectron2 drops the others
            bx, pr = bx[finite], pr[finite]
            num_c = pr.shape[1] - 1
            bx = bx.reshape(-1, bx.shape[1] // 4, 4)  # (P, C, 4), or (P, 1, 4) for class-agnostic regression
            bx = torch.stack([bx[..., 0].clamp(0, w), bx[..., 1].clamp(0, h), bx[..., 2].clamp(0, w),
                              bx[..., 3].clamp(0, h)], dim=-1).expand(-1, num_c, 4)
            b, s, c, _ = select_detections(bx, pr[:, :num_c], MAX_DETECTIONS, rh.box_predictor.test_nms_thresh,
                                          min_box=0.0)  # detectron2 keeps every nonempty box
            chosen.append((b, s, c))
            whole = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=b.device)
            finals.append(self._d2.Boxes(torch.cat([b, whole])))
        with self._autocast():
            pooled = box_features(model, features, finals).float()
        return results_in_input_pixels(chosen, pooled, images, batch.image_sizes)

    @torch.inference_mode()
    def forward_bare(self, images: list[torch.Tensor]) -> list[Any]:
        """GeneralizedRCNN.inference (with its post-processing) on the same inputs."""
        with self._autocast():
            return self.model.inference(self.inputs(images))
