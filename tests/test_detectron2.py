"""The detectron2 backend against detectron2 itself (random weights, demo photos at a reduced input size).

Skipped, with the reason, when detectron2 cannot be imported; CI installs it from a local wheel and sets
DEFRAG_REQUIRE_DETECTRON2=1, and then a failed import fails these tests instead.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache
from pipeline.detectors import DetectorError, describe_detector
from pipeline.detectors import detectron2_backend as d2b
from pipeline.detectors.select import select_detections
from pipeline.images import load_image
from pipeline.regions import RegionConfig, extract_shard

try:
    d2b._import()
    MISSING = ""
except DetectorError as e:
    MISSING = str(e)
if MISSING and os.environ.get("DEFRAG_REQUIRE_DETECTRON2") == "1":
    raise RuntimeError(f"DEFRAG_REQUIRE_DETECTRON2=1 but detectron2 does not import: {MISSING}")
needs_d2 = pytest.mark.skipif(bool(MISSING), reason=MISSING)

DEMO = Path("data/demo/images")
PHOTOS = ["rocket.jpg", "chelsea.png"]  # RGB files of different sizes (different padded inputs)
FPN = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
C4 = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
R101_C4 = "COCO-Detection/faster_rcnn_R_101_C4_3x.yaml"  # the README's example
MIN_SIZE, MAX_SIZE = 160, 256  # detector input: small, so R101 stays fast on 2 cores
PROPOSALS = 50  # RPN proposals per image (both our path and detectron2's use the same model)
_BUILT: dict = {}


def _config(zoo: str, **kw) -> RegionConfig:
    return RegionConfig(f"detectron2:{zoo}", kw.pop("weights", "random"), min_size=kw.pop("min_size", MIN_SIZE),
                        max_size=MAX_SIZE, **kw)


def _detector(zoo: str):
    """One random-weight detector per config for the module, with fewer proposals (built once: R101 is slow)."""
    if zoo not in _BUILT:
        torch.set_num_threads(2)
        det = _config(zoo).build("cpu")
        det.model.proposal_generator.post_nms_topk[False] = PROPOSALS
        _BUILT[zoo] = det
    return _BUILT[zoo]


def _store(det, config: RegionConfig, out: Path, photos=PHOTOS) -> cache.RegionBlock:
    """Run the shard writer on demo photos and read back what it stored."""
    items = [(p, DEMO / p) for p in photos]
    producer = config.producer()
    report = extract_shard(items, out, det, producer=producer, dataset={"name": "t"}, shard_index=0, num_shards=1,
                           batch_size=2)
    assert not report.failed
    return cache.read_region_shard(out)


def _predictor(det):
    """detectron2's DefaultPredictor around our model (its __init__ would build and load a second model)."""
    from detectron2.data import transforms as T
    from detectron2.engine import DefaultPredictor

    pred = DefaultPredictor.__new__(DefaultPredictor)
    pred.cfg, pred.model, pred.input_format = det.cfg.clone(), det.model, det.cfg.INPUT.FORMAT
    pred.aug = T.ResizeShortestEdge([det.cfg.INPUT.MIN_SIZE_TEST] * 2, det.cfg.INPUT.MAX_SIZE_TEST)
    return pred


def _spread_scores(det, features: np.ndarray) -> None:
    """Scale the class layer so its logits on these box features have std 2: random weights give saturated
    scores (many exactly 1.0, so ties would decide the order); scaled, every top score differs."""
    cls = det.model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        logits = cls(torch.as_tensor(features.reshape(-1, features.shape[-1]), dtype=torch.float32))
        scale = 2.0 / float(logits.std())
        cls.weight.mul_(scale)
        cls.bias.mul_(scale)


def _reference(det, photo: str):
    """detectron2's own answer for one photo, from one DefaultPredictor call: its instances (original pixels),
    one per proposal (the first, best-scoring, class of each), and those detections' box features from the ROI
    heads, pooled from the backbone features of that call (resized pixels). Score threshold 0 and no top-k cap:
    defrag's settings."""
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import Boxes

    model, predictor = det.model, det.model.roi_heads.box_predictor
    seen: dict = {}

    def inference(predictions, proposals):  # detectron2's own, noting which proposal each detection came from
        out = type(predictor).inference(predictor, predictions, proposals)
        seen["kept"] = out[1][0].tolist()
        return out

    hooks = [model.backbone.register_forward_hook(lambda m, i, o: seen.update(features=o)),
             model.roi_heads.register_forward_hook(  # before post-processing rescales the boxes in place
                 lambda m, i, o: seen.update(resized=o[0][0].pred_boxes.tensor.clone(), size=o[0][0].image_size))]
    predictor.inference, predictor.test_score_thresh, predictor.test_topk_per_image = inference, 0.0, -1
    try:
        with torch.inference_mode():
            final = _predictor(det)(read_image(str(DEMO / photo), format="BGR"))["instances"]
            assert len(final) == len(seen["kept"])  # no empty box removed: positions line up
            first = [i for i, p in enumerate(seen["kept"]) if p not in seen["kept"][:i]][:19]
            h, w = seen["size"]
            boxes = torch.cat([seen["resized"][first], torch.tensor([[0.0, 0.0, w, h]])])
            feats = d2b.box_features(model, seen["features"], [Boxes(boxes)])
    finally:
        for hook in hooks:
            hook.remove()
        del predictor.inference
        predictor.test_score_thresh, predictor.test_topk_per_image = det.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, \
            det.cfg.TEST.DETECTIONS_PER_IMAGE
    return final[first], feats


@needs_d2
@pytest.mark.parametrize("zoo", [FPN, C4, R101_C4])
def test_stored_regions_equal_detectron2_inference(zoo, tmp_path):
    det = _detector(zoo)
    config = _config(zoo)
    # As built (calibrated random weights): 19 regions per photo, features finite in float16.
    plain = _store(det, config, tmp_path / "plain.h5", PHOTOS[:1])
    assert plain.mask.all(), f"{zoo}: fewer than 19 regions: {plain.mask.sum(1)}"
    assert np.isfinite(plain.features).all() and np.abs(plain.features).max() < 6e4

    _spread_scores(det, plain.features.astype(np.float32))
    block = _store(det, config, tmp_path / "spread.h5")
    for i, photo in enumerate(PHOTOS):
        final, feats = _reference(det, photo)
        scores = final.scores.numpy()[:19]
        assert len(np.unique(scores)) == 19 and scores.max() - scores.min() > 0.02, f"scores not spread: {scores}"
        np.testing.assert_allclose(block.boxes[i, 1:], final.pred_boxes.tensor.numpy()[:19], rtol=1e-5, atol=1e-3)
        # float32 softmax of logits from a differently batched pass: a few 1e-6 apart on some CPUs
        np.testing.assert_allclose(block.scores[i, 1:], scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(block.labels[i, 1:], final.pred_classes.numpy()[:19])
        stored = block.features[i].astype(np.float32)  # float16 on disk: rows 1..19, then the whole image in row 0
        ref = feats.numpy()
        np.testing.assert_allclose(stored[1:], ref[:-1], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored[0], ref[-1], rtol=2e-3, atol=2e-3)
    _BUILT.pop(zoo)  # scaled: no longer "random weights as built"


@needs_d2
def test_random_weights_are_reproducible_for_a_seed():
    a, b = (_config(FPN).build("cpu").model.state_dict() for _ in range(2))
    stats = [k for k in a if k.endswith("running_var")]
    assert stats and all(not torch.equal(a[k], torch.ones_like(a[k]) - 1e-5) for k in stats)  # calibrated
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_d2
def test_an_image_with_no_proposals_gets_only_its_whole_image_row(tmp_path):
    det = _detector(FPN)
    rpn = det.model.proposal_generator
    rpn.min_box_size = 1e9  # every proposal too small: none survive
    try:
        final, _ = _reference(det, PHOTOS[0])
        assert len(final) == 0  # detectron2 itself: no detections
        block = _store(det, _config(FPN), tmp_path / "none.h5", PHOTOS[:1])
    finally:
        rpn.min_box_size = 0.0
    assert block.mask[0].tolist() == [True] + [False] * 19
    assert np.isfinite(block.features[0, 0]).all() and np.abs(block.features[0, 0]).sum() > 0


@needs_d2
def test_boxes_thinner_than_a_hundredth_pixel_are_kept_like_detectron2(tmp_path):
    det = _detector(FPN)
    bbox = det.model.roi_heads.box_predictor.bbox_pred
    saved = bbox.weight.clone(), bbox.bias.clone()
    with torch.no_grad():  # every regressed box 0.0005% as wide and high as its proposal: far below 0.01 px
        bbox.weight.zero_()
        bbox.bias.zero_()
        bbox.bias.view(-1, 4)[:, 2:] = -60.0  # dw = dh = -60 / 5 (the box transform weights): exp(-12)
    try:
        final, _ = _reference(det, PHOTOS[0])
        block = _store(det, _config(FPN), tmp_path / "thin.h5", PHOTOS[:1])
    finally:
        with torch.no_grad():
            bbox.weight.copy_(saved[0])
            bbox.bias.copy_(saved[1])
    sides = block.boxes[0, 1:, 2:] - block.boxes[0, 1:, :2]
    assert block.mask[0].all() and (sides > 0).all() and (sides < 0.01).all()
    np.testing.assert_allclose(block.scores[0, 1:], final.scores.numpy()[:19], rtol=1e-5)


def test_select_nonempty_rule_keeps_thin_boxes_and_drops_empty_ones():
    boxes = torch.tensor([[[0.0, 0.0, 0.005, 10.0]], [[5.0, 5.0, 5.0, 9.0]], [[1.0, 1.0, 4.0, 4.0]]])
    scores = torch.tensor([[0.9], [0.8], [0.7]])
    _, s, _, p = select_detections(boxes, scores, 19, 0.5, min_box=0.0)
    assert p.tolist() == [0, 2]  # 0.005 px wide kept, zero width dropped
    assert select_detections(boxes, scores, 19, 0.5)[3].tolist() == [2]  # torchvision's 0.01 px rule


@needs_d2
def test_min_size_test_zero_means_no_resize(tmp_path):
    base = Path(d2b._import().model_zoo.get_config_file(FPN))
    local = tmp_path / "noresize.yaml"
    local.write_text(f"_BASE_: {base}\nINPUT:\n  MIN_SIZE_TEST: 0\n")
    det = _detector(FPN)
    image = load_image(DEMO / "microaneurysms.png").tensor  # 102 x 102
    det.cfg.INPUT.MIN_SIZE_TEST = 0  # what that config gives; this model's weights are the same
    try:
        assert describe_detector(f"detectron2:{local}", "random")["min_size"] == 0
        assert det.inputs([image])[0]["image"].shape == (3, 102, 102)
        r = det.extract([image])[0]
    finally:
        det.cfg.INPUT.MIN_SIZE_TEST = MIN_SIZE
    assert len(r.boxes) == 19 and (r.boxes[:, 2:] <= 102).all()


@needs_d2
@pytest.mark.parametrize("zoo, what", [
    ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "META_ARCHITECTURE RetinaNet"),
    ("COCO-Detection/rpn_R_50_C4_1x.yaml", "META_ARCHITECTURE ProposalNetwork"),
    ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "ROI_HEADS CascadeROIHeads"),
    ("COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml", "PROPOSAL_GENERATOR PrecomputedProposals"),
    ("COCO-Detection/fcos_R_50_FPN_1x.py", "LazyConfig"),
])
def test_unsupported_models_are_refused_in_one_line_listing_what_works(zoo, what):
    with pytest.raises(DetectorError) as e:
        describe_detector(f"detectron2:{zoo}", "random")
    msg = str(e.value)
    assert what in msg and "supported: " in msg and "Res5ROIHeads" in msg and "\n" not in msg


@needs_d2
def test_checkpoint_url_is_asked_for_only_with_pretrained():
    zoo = "quick_schedules/mask_rcnn_R_50_C4_instant_test.yaml"  # a model-zoo config with no published weights
    assert describe_detector(f"detectron2:{zoo}", "random")["weights"] == "random"
    with pytest.raises(DetectorError, match="publishes no weights.*--detector-weights random"):
        describe_detector(f"detectron2:{zoo}", "pretrained")


def _local_chain(folder: Path, nms: str = "0.5") -> Path:
    """A local config whose _BASE_ is another local file, whose _BASE_ is the zoo's FPN config."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(d2b._import().model_zoo.get_config_file(FPN))
    (folder / "base.yaml").write_text(f"_BASE_: {base}\nMODEL:\n  ROI_HEADS:\n    NMS_THRESH_TEST: {nms}\n")
    (folder / "top.yaml").write_text("_BASE_: base.yaml\nINPUT:\n  MIN_SIZE_TEST: 200\n")
    return folder / "top.yaml"


@needs_d2
def test_local_config_identity_is_its_content_with_the_base_chain(tmp_path):
    key = lambda p: RegionConfig(f"detectron2:{p}", "random").producer()  # noqa: E731
    first, moved = _local_chain(tmp_path / "a"), _local_chain(tmp_path / "elsewhere" / "b")
    assert key(first) == key(moved)  # the same content in another folder: the same cache
    assert str(tmp_path) not in str(key(first))
    edited = _local_chain(tmp_path / "c", nms="0.6")  # only the _BASE_ file differs
    assert key(edited)["config_sha256"] != key(first)["config_sha256"]


@needs_d2
def test_weights_files_are_validated(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=d2b.__name__)
    fpn = _detector(FPN)
    good = tmp_path / "fpn.pth"
    torch.save({"model": fpn.model.state_dict()}, good)
    # A complete checkpoint of this config loads, is identified by its content and reproduces the model.
    loaded = _config(FPN, weights=str(good)).build("cpu")
    assert loaded.describe()["weights_sha256"] == cache.file_sha256(good)
    assert "backbone" in caplog.text and "filled" in caplog.text
    for k, v in fpn.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v)
    # FPN weights into a C4 model fill neither its backbone nor its heads: refused with the numbers.
    with pytest.raises(DetectorError, match=r"fpn\.pth do not fill.*backbone 0/\d+.*roi_heads \d+/\d+"):
        _config(C4, weights=str(good)).build("cpu")
    # A backbone alone (what an ImageNet checkpoint gives) leaves the RPN and box head random: refused.
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in fpn.model.state_dict().items() if k.startswith("backbone.")}}, backbone)
    with pytest.raises(DetectorError, match=r"proposal_generator 0/\d+"):
        _config(FPN, weights=str(backbone)).build("cpu")
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint")
    with pytest.raises(DetectorError, match="notes.pth: cannot be read as a detectron2 checkpoint"):
        _config(FPN, weights=str(notes)).build("cpu")


@needs_d2
def test_pretrained_with_a_local_config_loads_its_weights_or_refuses(tmp_path):
    top = _local_chain(tmp_path)  # MODEL.WEIGHTS inherited from Base-RCNN-FPN: an ImageNet backbone
    with pytest.raises(DetectorError, match="ImageNet backbone"):
        describe_detector(f"detectron2:{top}", "pretrained")
    good = tmp_path / "trained.pth"
    fpn = _detector(FPN)
    torch.save({"model": fpn.model.state_dict()}, good)
    with_weights = tmp_path / "with_weights.yaml"
    with_weights.write_text(f"_BASE_: top.yaml\nMODEL:\n  WEIGHTS: {good}\n")
    det = RegionConfig(f"detectron2:{with_weights}", "pretrained").build("cpu")
    assert det.describe()["weights_id"] == f"sha256:{cache.file_sha256(good)}"
    torch.testing.assert_close(det.model.roi_heads.box_predictor.cls_score.weight,
                               fpn.model.roi_heads.box_predictor.cls_score.weight)


def _describe_in_subprocess(hide: str) -> subprocess.CompletedProcess:
    """describe a detectron2 detector in a fresh interpreter where importing ``hide`` fails (as when it is not
    installed: None in sys.modules makes `import` raise ModuleNotFoundError for that name)."""
    code = (f"import sys; sys.modules[{hide!r}] = None\n"
            "from pipeline.detectors import describe_detector, DetectorError\n"
            f"try:\n    describe_detector('detectron2:{FPN}', 'random')\n"
            "except DetectorError as e:\n    print(e)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_missing_detectron2_is_reported_with_a_working_install_command():
    out = _describe_in_subprocess("detectron2").stdout
    assert "which is not installed" in out
    assert "setuptools<82" in out and "--no-build-isolation" in out and "pip wheel" in out


@needs_d2
def test_missing_pkg_resources_is_reported_as_the_real_cause():
    out = _describe_in_subprocess("pkg_resources").stdout
    assert "No module named 'pkg_resources'" in out and "pip install 'setuptools<82'" in out
    assert "not installed" not in out
