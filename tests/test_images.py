"""data.to_rgb / data.load_image: every image mode a dataset may hold ends as upright 8-bit RGB.

Pixel values are checked, not just the mode: a grey that turns black, a transparent pixel
that turns black instead of white, or a photo on its side would all silently hurt training.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed.data import load_image, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def saved(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def close(pixel, expected, tol: int = 0) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def half_red_half_blue(width: int = 32, height: int = 16) -> Image.Image:
    """Left half red, right half blue: where the red half ends up tells the rotation."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_exif_orientation_6_is_rotated_clockwise(tmp_path: Path, fmt: str, suffix: str) -> None:
    """Orientation 6 = "rotate 90 CW to display": the stored left edge becomes the top edge."""
    path = saved(tmp_path, half_red_half_blue(), f"phone.{suffix}", format=fmt, exif=exif_with_orientation(6),
                 **({"quality": 95} if fmt != "PNG" else {}))
    with Image.open(path) as raw:
        assert raw.size == (32, 16) and raw.getexif().get(0x0112) == 6
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 32)
    assert close(image.getpixel((8, 4)), RED, 40)  # top: was the left half
    assert close(image.getpixel((8, 28)), BLUE, 40)  # bottom: was the right half


@pytest.mark.parametrize("orientation,size,top_left", [
    (1, (32, 16), RED), (2, (32, 16), BLUE), (3, (32, 16), BLUE), (8, (16, 32), BLUE),
])
def test_other_exif_orientations(tmp_path: Path, orientation: int, size: tuple[int, int], top_left) -> None:
    path = saved(tmp_path, half_red_half_blue(), "o.png", exif=exif_with_orientation(orientation))
    image = load_image(path)
    assert image.size == size
    assert close(image.getpixel((1, 1)), top_left)


def test_grayscale(tmp_path: Path) -> None:
    grey = Image.fromarray(np.array([[0, 77, 128, 255]], np.uint8), mode="L")
    image = load_image(saved(tmp_path, grey, "g.png"))
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (77, 77, 77), (128, 128, 128), (255, 255, 255)]


def test_one_bit(tmp_path: Path) -> None:
    bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    image = load_image(saved(tmp_path, bits, "b.bmp"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette_image.putdata([0, 1, 2])
    plain = load_image(saved(tmp_path, palette_image, "p.png"))
    assert [plain.getpixel((x, 0)) for x in range(3)] == [RED, (0, 255, 0), BLUE]
    see_through = load_image(saved(tmp_path, palette_image, "t.png", transparency=1))
    assert [see_through.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, BLUE]
    gif = load_image(saved(tmp_path, palette_image, "p.gif", transparency=0))
    assert [gif.getpixel((x, 0)) for x in range(3)] == [WHITE, (0, 255, 0), BLUE]


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    image = load_image(saved(tmp_path, rgba, "a.png"))
    assert image.getpixel((0, 0)) == WHITE  # fully transparent red: background, not red or black
    assert image.getpixel((1, 0)) == BLUE
    assert close(image.getpixel((2, 0)), (127, 127, 127), 1)  # half-transparent black over white


def test_grey_with_alpha(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (50, 255)])
    image = load_image(saved(tmp_path, la, "la.png"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [WHITE, (50, 50, 50)]


@pytest.mark.parametrize("fmt,suffix,tol", [("JPEG", "jpg", 8), ("TIFF", "tif", 0)])
def test_cmyk(tmp_path: Path, fmt: str, suffix: str, tol: int) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    path = saved(tmp_path, cmyk, f"c.{suffix}", format=fmt)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    assert close(load_image(path).getpixel((4, 4)), RED, tol)


def test_16_bit_grey(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 40000, 65535]], np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 156, 255]  # 40000/65535*255 = 155.6


def test_16_bit_grey_dark_image_is_not_brightened(tmp_path: Path) -> None:
    """A 16-bit image whose values all happen to be small is still 16-bit data (stays near black)."""
    path = saved(tmp_path, Image.fromarray(np.array([[0, 200]], np.uint16)), "dark.png")
    assert load_image(path).getpixel((1, 0)) == (1, 1, 1)


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow can read but not write these)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb(tmp_path: Path) -> None:
    pixels = np.array([[[65535, 0, 0], [0, 32896, 65535]]], np.uint16)
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_rgb16(pixels))
    image = load_image(path)
    assert [image.getpixel((x, 0)) for x in range(2)] == [RED, (0, 128, 255)]


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    image = load_image(saved(tmp_path, Image.fromarray(values, mode="F"), "f.tif"))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_32_bit_int_with_8_bit_values() -> None:
    image = to_rgb(Image.fromarray(np.array([[0, 100, 255]], np.int32), mode="I"))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


@pytest.mark.parametrize("mode", ["RGB", "RGBX", "YCbCr", "HSV", "RGBa", "I;16B", "PA"])
def test_every_mode_gives_rgb(mode: str) -> None:
    assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert close(load_image(path).getpixel((1, 1)), RED, 2)


def test_load_image_closes_the_file(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.new("RGB", (2, 2)), "x.png")
    image = load_image(path)
    path.unlink()  # would fail on Windows if still open; here: the image is already decoded
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_in_memory_bytes() -> None:
    buffer = io.BytesIO()
    Image.new("L", (2, 2), 9).save(buffer, format="PNG")
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert to_rgb(image).getpixel((0, 0)) == (9, 9, 9)
