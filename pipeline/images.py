"""Image loading for the detector: any common file in, an RGB float tensor at a bounded size out.

Orientation: EXIF is applied first, so "original pixels" everywhere in defrag mean the image as a viewer shows
it (height and width after the EXIF transpose). Very large images are shrunk to ``max_side`` before the
detector sees them; ``LoadedImage.to_original`` maps boxes back to original pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)


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


def load_image(path: str | Path, max_side: int = 0) -> LoadedImage:
    """Open ``path`` as RGB with EXIF orientation applied; shrink so neither side exceeds ``max_side`` (0: never).

    Raises ImageLoadError naming the file and the reason (missing, not an image, truncated, too large).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as img:
            # The size a viewer shows: the header's, sides swapped by EXIF orientations 5-8.
            orig_w, orig_h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                orig_w, orig_h = orig_h, orig_w
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # decode big JPEGs at 1/2..1/8 size: fast
            img.load()  # truncated or damaged data fails here
            rgb = _to_rgb(_shrink(_to_8bit(ImageOps.exif_transpose(img)), max_side))
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read (check the file type)") from None
    except Image.DecompressionBombError as e:
        # Pillow's guard: over 2 x Image.MAX_IMAGE_PIXELS (179 million pixels by default).
        raise ImageLoadError(path, f"image too large to decode safely ({e}); shrink it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"damaged or truncated image ({e}); re-download or re-export it") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageLoadError(path, "image has zero width or height")

    arr = np.asarray(rgb, dtype=np.uint8)  # (h, w, 3)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return LoadedImage(tensor=tensor, height=orig_h, width=orig_w)


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

