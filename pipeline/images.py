"""Image loading for the detector: any common file in, an RGB float tensor at a bounded size out.

Containment: every image the project reads or copies (extraction, report thumbnails, alignment pictures) is
opened by ``open_inside(root, rel)``, which opens the file first and then checks what was opened: its real
path (``/proc/self/fd``) must lie inside the real image root and it must be a regular file. A symlink (to a
file, or a directory on the way) that leaves the root is refused; symlinks that stay inside work. Checking
the open descriptor leaves no window between the check and the read.

Orientation: EXIF is applied first, so "original pixels" everywhere in defrag mean the image as a viewer shows
it (height and width after the EXIF transpose). Very large images are shrunk to ``max_side`` before the
detector sees them, and very thin ones are stretched to at most ``MAX_ASPECT`` : 1 so that no detector's own
resize rounds a side to zero; ``LoadedImage.to_original`` maps boxes back to original pixels (per axis).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_ASPECT = 16  # thinner images are stretched across (10000 x 1 -> 2048 x 128): detectors resize by the long side


class ImageLoadError(ValueError):
    """An image file could not be used; ``reason`` is short and says what to do, for the failure summary."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class LoadedImage:
    tensor: torch.Tensor  # (3, h, w) float32 RGB in [0, 1], h, w <= max_side
    height: int  # original height after EXIF orientation
    width: int  # original width after EXIF orientation

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in tensor pixels (..., 4) -> original pixels, clipped to the image."""
        sx = self.width / self.tensor.shape[2]
        sy = self.height / self.tensor.shape[1]
        out = np.asarray(boxes, np.float32) * np.array([sx, sy, sx, sy], np.float32)
        return np.clip(out, 0, np.array([self.width, self.height, self.width, self.height], np.float32))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grey (I;16, I, F) -> L, rescaling the range instead of clipping it."""
    mode = img.mode
    if mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float32)
        if mode == "I" and a.size and a.max() > 255:
            a = a / 257.0  # a 16-bit range stored as 32-bit ints
        elif mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any 8-bit Pillow mode -> RGB; transparency is laid over white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, max_side: int = 0, root: str | Path | None = None) -> LoadedImage:
    """Open ``path`` as RGB with EXIF orientation applied; shrink so neither side exceeds ``max_side`` (0: never).

    ``path`` must resolve inside ``root`` (default: the file's own folder), see ``open_inside``. Raises
    ImageLoadError naming the file and the reason (outside the root, missing, not an image, truncated, too large).
    """
    path = Path(path)
    with open_inside(path.parent, path.name) if root is None else open_inside(root, rel_path(path, root)) as f:
        rgb, orig_h, orig_w = _decode(f, path, max_side)
    arr = np.asarray(rgb, dtype=np.uint8)  # (h, w, 3)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return LoadedImage(tensor=tensor, height=orig_h, width=orig_w)


def read_picture(path: str | Path, root: str | Path, max_side: int = 0) -> Image.Image:
    """The image as a viewer shows it (RGB, EXIF applied), for thumbnails and alignment pictures; contained in
    ``root`` like every read (``open_inside``). Raises ImageLoadError."""
    with open_inside(root, rel_path(path, root)) as f:
        return _decode(f, Path(path), max_side, unthin=False)[0]


def _decode(f: BinaryIO, path: Path, max_side: int, unthin: bool = True) -> tuple[Image.Image, int, int]:
    """(RGB image at most ``max_side`` (and, with ``unthin``, at most MAX_ASPECT : 1), original height, width)."""
    try:
        with Image.open(f) as img:
            # The size a viewer shows: the header's, sides swapped by EXIF orientations 5-8.
            orig_w, orig_h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                orig_w, orig_h = orig_h, orig_w
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # decode big JPEGs at 1/2..1/8 size: fast
            img.load()  # truncated or damaged data fails here
            rgb = _shrink(_to_8bit(ImageOps.exif_transpose(img)), max_side)
            rgb = _to_rgb(_unthin(rgb) if unthin else rgb)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read (check the file type)") from None
    except Image.DecompressionBombError as e:
        # Pillow's guard: over 2 x Image.MAX_IMAGE_PIXELS (179 million pixels by default).
        raise ImageLoadError(path, f"image too large to decode safely ({e}); shrink it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"damaged or truncated image ({e}); re-download or re-export it") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageLoadError(path, "image has zero width or height")
    return rgb, orig_h, orig_w


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Resize so neither side exceeds ``max_side``, in a mode Pillow resamples (before the RGB copy: cheap)."""
    w, h = img.size
    if not max_side or max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _unthin(img: Image.Image) -> Image.Image:
    """Stretch the short side so the image is at most MAX_ASPECT : 1 (``to_original`` maps boxes back per axis)."""
    w, h = img.size
    if min(w, h) < 1 or max(w, h) <= MAX_ASPECT * min(w, h):
        return img
    cap = int((MAX_ASPECT * (Image.MAX_IMAGE_PIXELS or 1 << 26)) ** 0.5)  # the stretched image stays decodable-sized
    if max(w, h) > cap:
        img = _shrink(img, cap)
        w, h = img.size
    size = (max(w, -(-h // MAX_ASPECT)), max(h, -(-w // MAX_ASPECT)))  # ceil: the short side grows only
    if img.mode in ("P", "1"):
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.resize(size, Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------------- containment

def rel_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` as given (no resolving: ``open_inside`` checks where it really leads)."""
    return os.path.relpath(os.fspath(path), os.fspath(root))


def _opened_path(fd: int, shown: str) -> str:
    """The real path of an open descriptor (Linux: /proc/self/fd; elsewhere realpath, checked by inode)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(shown)
        a, b = os.fstat(fd), os.stat(real)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise ImageLoadError(shown, "the file changed while it was opened; rerun") from None
        return real


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def open_inside(root: str | Path, rel: str | Path) -> BinaryIO:
    """Open ``root/rel`` for reading, but only if the file it resolves to is a regular file inside ``root``.

    Raises ImageLoadError with a reason: outside the image root (a symlink leaves it), missing, not a regular
    file, path too long, permission denied. The returned file is the one checked (no re-open by name).
    """
    shown = os.path.join(os.fspath(root), os.fspath(rel))
    try:
        root_real = os.path.realpath(root)
        st = os.stat(shown)  # refuse FIFOs and devices without opening them (opening can block or act)
        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError(shown, "not a regular file")
        fd = os.open(shown, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except ImageLoadError:
        raise
    except ValueError as e:  # an embedded NUL
        raise ImageLoadError(shown, f"unusable path ({e})") from None
    except OSError as e:
        raise ImageLoadError(shown, _os_reason(e)) from None
    try:
        real = _opened_path(fd, shown)
        if not _inside(real, root_real):
            raise ImageLoadError(shown, f"resolves to {real}, outside the image root {root_real} (a symlink leads "
                                        "out of it); copy the file into the image root or pass --image-root")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageLoadError(shown, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "file not found"
    if e.errno == errno.ENAMETOOLONG:
        return "path too long for the file system (File name too long); shorten the path in the dataset"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; make the file readable"
    return f"cannot be opened ({e.strerror or e})"
