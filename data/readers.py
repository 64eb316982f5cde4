"""``--dataset`` and ``--image-root`` -> a Dataset: registered names, then paths by their form.

    demo                      the bundled demo set (data/demo/captions.jsonl, images in data/demo/images)
    <file>.json               Karpathy's split JSON                         (data/karpathy.py)
    <file>.jsonl              plain JSONL, one caption per line              (data/jsonl.py)
    <...>.token.txt, or a folder holding Flickr8k.token.txt: Flickr8k's own files (data/flickr8k.py)
    a folder holding {split}_caps.txt (or its test_caps.txt / testall_caps.txt): a SCAN / VSE++ precomp
                              folder (data/precomp.py; no image files)

Without ``image_root`` the images are looked for beside the dataset file: the first of the format's usual image
folders that exists there (for Flickr8k also beside the text folder, as the two original zips unpack), else the
dataset file's folder itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .flickr8k import TOKEN_FILE, read_flickr8k
from .jsonl import read_jsonl
from .karpathy import read_karpathy_json
from .precomp import is_precomp_folder, read_precomp
from . import DEMO_DIR
from .records import Dataset, DatasetError

REGISTERED = {"demo": DEMO_DIR / "captions.jsonl"}

Reader = Callable[[Path, Path, str], Dataset]
# format -> (reader, image folders to look for beside the file, in order)
FORMATS: dict[str, tuple[Reader, tuple[str, ...]]] = {
    "karpathy": (read_karpathy_json, ("images",)),
    "jsonl": (read_jsonl, ("images",)),
    "flickr8k": (read_flickr8k, ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")),
    "precomp": (read_precomp, ()),
}


def dataset_format(path: Path) -> str:
    if path.is_dir() or path.name.endswith("_caps.txt"):
        return "precomp"
    if path.suffix == ".json":
        return "karpathy"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.name.endswith(".token.txt"):
        return "flickr8k"
    raise DatasetError(f"{path}: unknown dataset format — give a Karpathy split JSON (*.json), a JSONL "
                       f"(*.jsonl), Flickr8k's {TOKEN_FILE} (or its folder) or a precomp folder")


def default_image_root(path: Path, fmt: str) -> Path:
    if fmt == "precomp":  # no image files: the folder itself
        return path if path.is_dir() else path.parent
    folders = [path.parent, path.parent.parent] if fmt == "flickr8k" else [path.parent]
    for folder in folders:
        for name in FORMATS[fmt][1]:
            if (folder / name).is_dir():
                return folder / name
    return path.parent


def dataset_name(path: Path, fmt: str) -> str:
    """A short readable name for cache folders (their hash, not the name, keeps datasets apart)."""
    if fmt == "flickr8k":
        return "flickr8k"
    if fmt == "precomp":
        return path.name if path.is_dir() else path.parent.name
    return path.stem.removeprefix("dataset_")  # dataset_coco.json -> coco


def resolve(dataset: str | Path) -> tuple[Path, str]:
    """(dataset file, name) for a registered name or a path (a Flickr8k folder means its token file)."""
    if str(dataset) in REGISTERED:
        return REGISTERED[str(dataset)], str(dataset)
    path = Path(dataset).expanduser()
    if path.is_dir() and not is_precomp_folder(path):
        if not (path / TOKEN_FILE).is_file():
            raise DatasetError(f"{path}: a folder, but it holds no {TOKEN_FILE} and no precomp files "
                               "({split}_caps.txt) — pass the dataset file itself")
        path = path / TOKEN_FILE
    elif not path.exists():
        raise DatasetError(f"unknown dataset {str(dataset)!r}: not a registered name ({', '.join(REGISTERED)}) "
                           "and no such file or folder")
    return path, dataset_name(path, dataset_format(path))


def read_dataset(dataset: str | Path, image_root: str | Path | None = None) -> Dataset:
    path, name = resolve(dataset)
    fmt = dataset_format(path)
    root = Path(image_root).expanduser() if image_root else default_image_root(path, fmt)
    return FORMATS[fmt][0](path, root, name)
