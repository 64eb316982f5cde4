"""Checkpoints of a training run: atomic writes, safe loads (weights_only=True), refusal of a mismatch.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts only, so ``torch.load(weights_only=True)``
reads it): ``model`` (state dict), ``model_config`` (DeFrag's constructor arguments), ``optimizer``,
``epoch`` (epochs completed), ``rng`` (torch and CUDA generator states), ``config`` (the training
configuration), ``vocab_key``, ``cache_keys`` ({"regions", "triples"}), ``vocab_words``/``vocab_relations``,
``history`` (the per-epoch log records), ``best`` (the best epoch's record).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from .defrag import DeFrag

log = logging.getLogger(__name__)

LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another vocabulary or cache."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file exists but cannot be unpickled safely (damaged, truncated or not a defrag checkpoint)."""


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: what torch.save will write, give or take its index."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _space_error(folder: Path, need: int, free: int) -> CheckpointError:
    return CheckpointError(f"not enough space in {folder} for the checkpoint: about {need / 2**20:.1f} MiB needed, "
                           f"{free / 2**20:.1f} MiB free; free space there (or use another --run-dir) and rerun with "
                           "--resume: the previous checkpoint is intact")


def save_checkpoint(path: str | Path, state: Mapping[str, Any], also: str | Path | None = None) -> Path:
    """Write ``state`` to a temporary file beside ``path`` and rename it: a kill never leaves half a checkpoint.
    ``also``: a second path that gets a copy of the same file (serialised once).

    The space is estimated first (both files, before the old ones are replaced); a full disk, found then or
    during the write, raises a CheckpointError naming the folder and the space, and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = (int(1.05 * state_bytes(state)) + 2**16) * (2 if also is not None else 1)  # + records, zip index
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise _space_error(path.parent, need, free)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    copy = Path(also).with_name(f".{Path(also).name}.tmp-{os.getpid()}") if also is not None else None
    try:
        torch.save(dict(state), tmp)
        if also is not None:
            shutil.copyfile(tmp, copy)
            os.replace(copy, also)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch reports a full disk as a RuntimeError of its zip writer; the free space tells them apart
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                shutil.disk_usage(path.parent).free < need:
            raise _space_error(path.parent, need, shutil.disk_usage(path.parent).free) from None
        raise
    finally:
        for t in (tmp, copy):
            if t is not None and t.exists():
                t.unlink()
    return path


def _load_failure(e: Exception) -> str:
    """One line for a failed safe load; torch's own text advises weights_only=False, which would run the file."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if m:
        return f"it would call {m.group(1)} when unpickled, which a defrag checkpoint never does: do not load it"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def load_checkpoint(path: str | Path, expect_vocab_key: str | None = None,
                    expect_cache_keys: Mapping[str, str] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; refuse one of another vocabulary or cache, naming both."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train first (TrainEmbedding)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read ({_load_failure(e)}): "
                                   "it is damaged or not a defrag checkpoint") from None
    if not isinstance(ckpt, dict):
        raise CheckpointUnreadable(f"checkpoint {path} is not a defrag checkpoint (it holds a "
                                   f"{type(ckpt).__name__}): give a checkpoint written by TrainEmbedding")
    check_checkpoint(ckpt, path, expect_vocab_key, expect_cache_keys)
    return ckpt


def check_checkpoint(ckpt: Mapping[str, Any], path: str | Path, expect_vocab_key: str | None = None,
                     expect_cache_keys: Mapping[str, str] | None = None) -> None:
    """Refuse a checkpoint of another vocabulary or another cache than the caller reads, naming both."""
    if expect_vocab_key is not None and ckpt.get("vocab_key") != expect_vocab_key:
        raise CheckpointError(f"checkpoint {path} was trained with vocabulary {ckpt.get('vocab_key')!r}, but "
                              f"this run uses vocabulary {expect_vocab_key!r}: use a run of this vocabulary "
                              "or start a new run (another --run-name)")
    if expect_cache_keys is not None:
        have = dict(ckpt.get("cache_keys") or {})
        for kind, key in expect_cache_keys.items():
            if have.get(kind) != key:
                raise CheckpointError(f"checkpoint {path} was trained on the {kind} cache {have.get(kind)!r}, "
                                      f"but this run reads {key!r}: use a run of this cache or start a new "
                                      "run (another --run-name)")


def checkpoint_path(run_dir_or_ckpt: str | Path, which: str = "best") -> Path:
    """A run folder -> its best (or last) checkpoint; a file path is returned as it is."""
    p = Path(run_dir_or_ckpt)
    if p.is_dir():
        name = BEST if which == "best" else LAST
        if not (p / name).exists() and (p / LAST).exists():
            name = LAST
        return p / name
    return p


def load_model(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu", which: str = "best",
               expect_vocab_key: str | None = None,
               expect_cache_keys: Mapping[str, str] | None = None) -> tuple[DeFrag, dict[str, Any]]:
    """Rebuild the trained DeFrag model of a run folder (its best checkpoint) or of a checkpoint file."""
    path = checkpoint_path(run_dir_or_ckpt, which)
    ckpt = load_checkpoint(path, expect_vocab_key, expect_cache_keys)
    if not {"model", "model_config"} <= set(ckpt):
        raise CheckpointUnreadable(f"checkpoint {path} is not a defrag checkpoint (it holds keys "
                                   f"{sorted(map(str, ckpt))[:8]}, not a model and its model_config): give a "
                                   "checkpoint written by TrainEmbedding")
    try:
        model = DeFrag(**ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a config or weights of another model
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointUnreadable(f"checkpoint {path} does not rebuild a DeFrag model ({type(e).__name__}: "
                                   f"{first}): it is damaged or not a defrag checkpoint") from None
    return model.to(device).eval(), ckpt
