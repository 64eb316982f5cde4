"""Flickr8k's own text files: ``Flickr8k.token.txt`` and the split lists beside it.

    Flickr8k.token.txt           <image>#<n>\\t<caption>     (5 captions per image, n = 0..4)
    Flickr_8k.trainImages.txt    one image filename a line  (6,000)
    Flickr_8k.devImages.txt      ... (1,000; our "val")
    Flickr_8k.testImages.txt     ... (1,000)

Image id = image path = the filename. Caption id = the key as written in the token file (``<image>#<n>``), so ids
match Flickr8k's other files (ExpertAnnotations.txt, CrowdFlowerAnnotations.txt).

The token file captions 8,092 images, 92 of them in no split list: they and their captions are left out of the
Dataset (every image of a Dataset has a split), as the official splits intend.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from .checks import DatasetBuilder, image_path, text_lines
from .records import CaptionRecord, Dataset, DatasetError

log = logging.getLogger(__name__)

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}

# The original token file has one odd key, `2258277193_586949ec62.jpg.1#0`, next to that image's #1..#4 and no
# #0: it is that image's first caption with a stray ".1" (the caption, "people waiting for the subway", fits
# the others). So a key whose image name is a captioned "<x>.jpg" plus ".<digits>" belongs to image "<x>.jpg";
# its caption id stays the key as written, which no other line uses (keys are checked unique), so it cannot
# collide with a real "<x>.jpg#<n>". The image then has its 5 captions and the file 8,092 images.
_STRAY_SUFFIX = re.compile(r"^(?P<image>.+\.jpe?g)\.\d+$", re.IGNORECASE)


def read_token_file(path: Path) -> dict[str, list[CaptionRecord]]:
    """Image id -> its captions, in file order (every captioned image, whether or not a split list names it)."""
    entries: list[tuple[str, str, str, int]] = []  # (caption id, image name as written, text, line)
    seen: dict[str, int] = {}
    for lineno, line in text_lines(path):
        where = f"{path}:{lineno}"
        key, tab, text = line.partition("\t")
        image, hash_, n = key.strip().rpartition("#")
        if not tab or not hash_ or not image or not n.isdigit():
            raise DatasetError(f"{where}: expected '<image>#<n><TAB><caption>', got {line!r:.80} — is this "
                               f"{TOKEN_FILE}?")
        key = key.strip()
        if key in seen:
            raise DatasetError(f"{where}: caption id {key!r} was already used at line {seen[key]} — caption ids "
                               "must be unique")
        seen[key] = lineno
        entries.append((key, image, text.strip(), lineno))

    names = {image for _, image, _, _ in entries}
    out: dict[str, list[CaptionRecord]] = {}
    ids: dict[str, str] = {}  # image name as written -> image id (checked once per image)
    for key, image, text, lineno in entries:
        stray = _STRAY_SUFFIX.match(image)
        if stray and stray["image"] in names:
            log.info("%s:%d: caption %r taken as a caption of %s (stray suffix in the image name)",
                     path, lineno, key, stray["image"])
            image = stray["image"]
        if image not in ids:
            ids[image] = image_path(image, f"{path}:{lineno}")
        out.setdefault(ids[image], []).append(CaptionRecord(key, ids[image], text))
    return out


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """(image id, line) of each image a split list names."""
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found — put the Flickr8k split lists "
                           f"({', '.join(SPLIT_FILES.values())}) beside {TOKEN_FILE}")
    return [(image_path(line.strip(), f"{path}:{n}"), n) for n, line in text_lines(path)]


def read_flickr8k(token_path: Path, image_root: Path, name: str) -> Dataset:
    captions = read_token_file(token_path)
    split_of: dict[str, tuple[str, str]] = {}  # image id -> (split, where)
    for split, filename in SPLIT_FILES.items():
        list_path = token_path.parent / filename
        for image_id, lineno in read_split_list(list_path):
            where = f"{list_path}:{lineno}"
            if image_id in split_of:
                raise DatasetError(f"{where}: image {image_id!r} is already in split {split_of[image_id][0]!r} "
                                   f"({split_of[image_id][1]}) — an image belongs to one split")
            split_of[image_id] = (split, where)

    out = DatasetBuilder(token_path)
    for image_id, caps in captions.items():
        if image_id not in split_of:
            continue
        out.add_image(image_id, image_id, split_of[image_id][0], split_of[image_id][1])
        for c in caps:
            out.add_caption(c.caption_id, image_id, c.text, None, f"{token_path}: caption {c.caption_id!r}")
    unsplit = len(captions) - len(out.images)
    uncaptioned = [i for i in split_of if i not in captions]
    if unsplit:
        log.info("%s: %d captioned images are in no split list; left out", token_path, unsplit)
    if uncaptioned:
        log.warning("%s: %d images of the split lists have no caption in %s (first: %s); left out",
                    token_path.parent, len(uncaptioned), TOKEN_FILE, uncaptioned[0])
    return out.build(name, image_root)
