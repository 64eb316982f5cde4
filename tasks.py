"""The Luigi tasks of defrag: thin wiring only; each task calls one function of pipeline/ or model/.

    luigi --module tasks ExtractRegions --dataset demo --local-scheduler
    luigi --module tasks ParseSentences --dataset demo --local-scheduler
    luigi --module tasks BuildVocab     --dataset demo --local-scheduler
    luigi --module tasks TrainEmbedding --dataset demo --local-scheduler
    luigi --module tasks Evaluate       --dataset demo --local-scheduler
"""
from __future__ import annotations

import logging

import luigi

log = logging.getLogger("defrag.tasks")


class defrag(luigi.Config):  # noqa: N801 - the section name in luigi.cfg
    cache_dir = luigi.Parameter(default="cache")
    run_dir = luigi.Parameter(default="runs")


class DatasetTask(luigi.Task):
    """Parameters every task shares: which dataset, where its images are, where caches go."""

    dataset = luigi.Parameter(default="demo", description="registered name (demo) or a dataset file path")
    image_root = luigi.Parameter(default="", description="folder the dataset's image paths are relative to")
    cache_dir = luigi.Parameter(default="", description="cache folder (default: [defrag] cache_dir)")

    def load(self):
        from data import load_dataset

        return load_dataset(self.dataset, self.image_root or None)

    @property
    def cache_root(self) -> str:
        return self.cache_dir or defrag().cache_dir


def device_resources(device: str) -> dict[str, int]:
    """GPU tasks declare a `gpu` resource so a scheduler never puts two on one card."""
    from pipeline.devices import resolve_device

    return {"gpu": 1} if resolve_device(device).startswith("cuda") else {}
