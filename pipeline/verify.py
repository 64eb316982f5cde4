"""Check a whole cache for damage: every shard opened, every chunk of every dataset read (fletcher32 checksums
checked by HDF5 on each read), the completion record and string offsets checked.

    python -m pipeline.verify cache                      # every shard under the folder, recursively
    python -m pipeline.verify cache/regions/demo-0123abcd --json

Prints one line per damaged shard (path: reason) and a summary; exits 0 when everything is whole, 1 when
something is damaged (delete the listed shards and rerun the stage-1 task: only they are recomputed), 2 when the
folder does not exist.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .cache import SCHEMA_VERSION, shard_info

log = logging.getLogger(__name__)

FIX = "delete the damaged shards and rerun the stage-1 task that wrote them (only they are recomputed)"


@dataclass
class CacheReport:
    folder: Path
    shards: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # shard path -> reason
    temporary: list[str] = field(default_factory=list)  # leftovers of interrupted writes (harmless)

    @property
    def ok(self) -> bool:
        return not self.damaged


def _read_every_chunk(dset: h5py.Dataset) -> None:
    """Read the whole dataset a block of chunks at a time (bounded memory); a bad checksum raises OSError."""
    if dset.shape is None or dset.size == 0:
        return
    step = max(1, (dset.chunks[0] if dset.chunks else dset.shape[0]) * 16)
    for start in range(0, dset.shape[0], step):
        dset[start:start + step]


def verify_shard(path: str | Path) -> str | None:
    """None when the shard is whole and every checksum matches, else the reason."""
    try:
        with h5py.File(path, "r") as f:
            info = shard_info(f)
            if info.schema_version != SCHEMA_VERSION:
                return f"schema version {info.schema_version}, this defrag reads {SCHEMA_VERSION}"
            if int(f.attrs.get("complete", 0)) != 1:
                return "no completion record (an unfinished write)"
            for name, dset in f.items():
                if not isinstance(dset, h5py.Dataset):
                    continue
                try:
                    _read_every_chunk(dset)
                except OSError as e:
                    return f"dataset {name!r} cannot be read ({str(e).splitlines()[0]})"
                if name.endswith("_offsets"):
                    offsets = dset[()]
                    flat = f[name[: -len("_offsets")]]
                    if len(offsets) and (offsets[0] != 0 or offsets[-1] != flat.shape[0]
                                         or np.any(np.diff(offsets) < 0)):
                        return f"string offsets {name!r} do not match their bytes"
    except OSError as e:
        return f"cannot be opened ({str(e).splitlines()[0]})"
    except Exception as e:  # noqa: BLE001 - any way a file is unreadable is damage to report, not a crash
        return f"{type(e).__name__}: {e}"
    return None


def verify_cache(folder: str | Path) -> CacheReport:
    """Every ``shard-*.h5`` under ``folder`` (recursively), verified."""
    folder = Path(folder)
    report = CacheReport(folder)
    shards = sorted(folder.rglob("shard-*.h5"))
    report.temporary = [str(p) for p in sorted(folder.rglob(".shard-*.h5.tmp-*"))]
    for path in tqdm(shards, desc="verify", unit="shard", leave=False, disable=None):
        report.shards += 1
        reason = verify_shard(path)
        if reason:
            log.warning("damaged cache shard %s: %s", path, reason)
            report.damaged[str(path)] = reason
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="cache folders (the cache root, or one regions/triples folder)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        print(f"error: {missing[0]} is not a folder: give the cache folder (e.g. cache)", file=sys.stderr)
        return 2
    reports = [verify_cache(f) for f in args.folders]
    if args.json:
        print(json.dumps([{"folder": str(r.folder), "shards": r.shards, "damaged": r.damaged,
                           "temporary": r.temporary} for r in reports], indent=2))
    else:
        for r in reports:
            for path, reason in r.damaged.items():
                print(f"DAMAGED {path}: {reason}")
            print(f"{r.folder}: {r.shards} shard(s) checked, {len(r.damaged)} damaged"
                  + (f", {len(r.temporary)} leftover temporary file(s) (harmless)" if r.temporary else ""))
        if any(not r.ok for r in reports):
            print(f"fix: {FIX}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
