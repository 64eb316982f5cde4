"""A small trained run on the demo set, made by the real pipeline: TrainEmbedding through Luigi's local scheduler,
with the random-weight MobileNet detector at a small input size and the project's small Stanza models.

It trains with ``--smooth 1`` (not the default 10), so tests of evaluation and retrieval can tell whether the
run's own smoothing was used. A few seconds of detection, parsing and training on two cores.
"""
from __future__ import annotations

from pathlib import Path

import luigi
from luigi.execution_summary import LuigiStatusCode

MODELS = Path(__file__).resolve().parent / "stanza_models"
TAGGER, PARSER = MODELS / "en_ewt_tagger_small.pt", MODELS / "en_ewt_parser_small.pt"
SMOOTH = 1.0  # the run's smoothing n; the default is 10


def small_run_params(root: Path, **overrides) -> dict:
    for f in (TAGGER, PARSER):
        assert f.is_file(), f"{f} is missing: build it with tests/stanza_models/build_models.sh"
    p = dict(dataset="demo", cache_dir=str(root / "cache"), run_dir=str(root / "runs"), device="cpu",
             detector="torchvision-mobilenet-v3-fpn", detector_weights="random", max_image_side=256, min_size=128,
             max_size=192, stanza_tagger=str(TAGGER), stanza_parser=str(PARSER), min_count=1, epochs=2,
             batch_size=8, lr=1e-3, grad_clip=1.0, embedding_dim=16, word_dim=8, smooth=SMOOTH, progress=False,
             word_vectors="none")  # W_e learned (d 8), not the demo's default GloVe vectors
    p.update(overrides)
    return p


def build_small_run(root: Path, **overrides) -> Path:
    """Train the small run under ``root``; return its run folder (with dataset.json, as TrainEmbedding writes it)."""
    import tasks

    task = tasks.TrainEmbedding(**small_run_params(root, **overrides))
    result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    return task.run_folder()
