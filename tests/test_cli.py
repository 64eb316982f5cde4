"""The `luigi --module tasks ...` command line as a user meets it: --help text and exit status."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import luigi
import pytest
from luigi.cmdline_parser import CmdlineParser

import tasks

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TASKS = ["ExtractRegions", "ParseSentences", "BuildVocab", "TrainEmbedding", "Evaluate", "Report"]


def luigi_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real `luigi` command line in a subprocess of this interpreter's environment."""
    return subprocess.run([sys.executable, "-m", "luigi", "--module", "tasks", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("task", TASKS)
def test_every_parameter_has_a_description_and_its_default_in_help(task):
    parser = CmdlineParser._build_parser(root_task=task)
    local = {a.option_strings[0]: a.help for a in parser._actions
             if a.option_strings and a.dest in dict(getattr(tasks, task).get_params())}
    assert len(local) == len(getattr(tasks, task).get_params())
    for flag, text in local.items():
        assert text and "(default: " in text, f"{flag}: {text!r}"
        assert text.index("(default: ") > 0, f"{flag} has no description: {text!r}"


def test_help_shows_defaults_on_the_real_command_line():
    out = luigi_cli("TrainEmbedding", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "--epochs EPOCHS passes over the training captions (default: 20)" in text
    assert "--lr LR learning rate (default: 0.001)" in text
    assert "(default: torchvision-r50-fpn-v2)" in text


def test_passed_through_parameters_keep_type_and_default():
    assert isinstance(tasks.TrainEmbedding.detector_seed, luigi.IntParameter)
    assert tasks.TrainEmbedding.region_shard_size._default == tasks.ExtractRegions.shard_size._default
    assert tasks.TrainEmbedding.detector_seed.description.startswith("ExtractRegions --seed")
    assert set(tasks.TrainEmbedding.feature_dtype._choices) == {"float16", "float32"}
