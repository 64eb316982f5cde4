"""Image loading: every common file kind becomes RGB [0, 1] at a bounded size; bad files get clear reasons."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import ImageLoadError, load_image

DEMO = "data/demo/images"


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_demo_photo_rgb_unit_range():
    im = load_image(f"{DEMO}/rocket.jpg")
    assert im.tensor.dtype == torch.float32 and im.tensor.shape == (3, im.height, im.width) == (3, 427, 640)
    assert 0.0 <= im.tensor.min() and im.tensor.max() <= 1.0 and im.tensor.std() > 0.05


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64 ramp
    im = load_image(_save(Image.fromarray(arr, "L"), tmp_path / "g.png"))
    assert im.tensor.shape == (3, 16, 64)
    assert torch.equal(im.tensor[0], im.tensor[1]) and torch.equal(im.tensor[1], im.tensor[2])
    assert im.tensor[0, 0, -1] == pytest.approx(252 / 255)


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 256]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    t = load_image(path).tensor[0, 0]
    assert t[0] == 0 and t[1] == pytest.approx(128 / 255) and t[2] == 1.0 and t[3] == pytest.approx(1 / 255)


def test_palette_with_transparency_and_rgba_go_over_white(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # palette index 0 (black) is transparent
    t = load_image(_save(pal, tmp_path / "p.png", transparency=0)).tensor
    assert t[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and t[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    rgba = Image.new("RGBA", (3, 2), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    t = load_image(_save(rgba, tmp_path / "a.png")).tensor
    assert t[:, 0, 0].tolist() == [0.0, 0.0, 1.0] and t[:, 1, 2].tolist() == [1.0, 1.0, 1.0]


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)  # red in CMYK
    im = load_image(path)
    assert im.tensor.shape == (3, 6, 8)
    r, g, b = im.tensor.mean(dim=(1, 2)).tolist()
    assert r > 0.8 and g < 0.2 and b < 0.2


def test_exif_orientation_applied_and_sides_swapped(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored left half ends up on top
    im = load_image(_save(img, tmp_path / "rot.jpg", exif=exif, quality=95))
    assert (im.height, im.width) == (40, 20) and im.tensor.shape == (3, 40, 20)
    top, bottom = im.tensor[:, :15].mean(dim=(1, 2)), im.tensor[:, 25:].mean(dim=(1, 2))
    assert top[0] > 0.8 > top[2] and bottom[2] > 0.8 > bottom[0]


def test_one_pixel_image(tmp_path):
    im = load_image(_save(Image.new("RGB", (1, 1), (255, 255, 0)), tmp_path / "one.png"), max_side=64)
    assert (im.height, im.width) == (1, 1) and im.tensor[:, 0, 0].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 100 M pixels: Pillow warns, decodes
def test_very_large_image_is_shrunk_and_boxes_map_back(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 200).save(big, compress_level=1)
    im = load_image(big, max_side=500)
    assert (im.height, im.width) == (10_000, 10_000) and im.tensor.shape == (3, 500, 500)
    back = im.to_original(np.array([[0, 0, 250, 500], [10, 10, 600, 600]]))
    assert back.tolist() == [[0, 0, 5000, 10000], [200, 200, 10000, 10000]]  # scaled, then clipped


def test_wide_image_shrinks_on_long_side(tmp_path):
    im = load_image(_save(Image.new("RGB", (300, 100)), tmp_path / "wide.png"), max_side=150)
    assert im.tensor.shape == (3, 50, 150) and (im.height, im.width) == (100, 300)


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_text("this is not a picture\n"), "not an image file"),
    (lambda p: p.write_bytes(open(f"{DEMO}/rocket.jpg", "rb").read()[:5000]), "truncated"),
    (lambda p: p.mkdir(), "not a regular file"),
])
def test_bad_files_raise_with_path_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert reason in e.value.reason and str(path) in str(e.value)
