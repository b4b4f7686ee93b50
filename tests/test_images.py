"""classifier.images: every odd or hostile image either opens as plain 8-bit pixels or is refused."""

import io

import numpy as np
import pytest
from PIL import Image

from classifier.images import MAX_IMAGE_PIXELS, ImageError, open_image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_rgb_passes_through(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[0, 0] = 0
    array[0, 1] = 32896  # 128 * 257
    image = open_image(_png(Image.fromarray(array)))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels[0, 0, 0] == 0 and pixels[0, 1, 0] == 128 and pixels[5, 5, 0] == 255


def test_rgba_is_flattened_onto_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    pixels = np.asarray(open_image(_png(rgba)))
    assert (pixels == 255).all()


def test_palette_gif_with_transparency(tmp_path):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    path = tmp_path / "x.gif"
    image.save(path, transparency=0)
    pixels = np.asarray(open_image(path))
    assert pixels.shape == (10, 10, 3) and tuple(pixels[0, 0]) == (0, 0, 255)


def test_cmyk_becomes_rgb(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(path)  # red in CMYK
    pixels = np.asarray(open_image(path), dtype=int)
    assert pixels.shape == (12, 12, 3) and pixels[6, 6, 0] > 200 and pixels[6, 6, 1] < 60


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (20, 60)


def test_grayscale_request():
    image = open_image(_png(Image.new("RGB", (5, 5), (255, 255, 255))), channels=1)
    assert image.mode == "L"


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
])
def test_refuses_non_images(tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        open_image(path)


def test_refuses_truncated_image(tmp_path):
    data = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match="damaged or truncated"):
        open_image(path)


def test_refuses_decompression_bomb():
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    bomb = _png(Image.new("1", (side, side)))  # compresses to a few KB, decodes to ~90 MP
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="too large"):
        open_image(bomb)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.jpg")


def _large_photo(path, width=4000, height=3000, orientation=None):
    """A smooth, photo-like JPEG (colour gradients and a disc), large enough to be drafted."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xx / width * 255, yy / height * 255, ((xx + yy) / (width + height)) * 255], -1)
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.6) ** 2 < (height * 0.2) ** 2
    pixels[disc] = (230, 40, 40)
    image = Image.fromarray(pixels.astype(np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return path


def test_large_jpeg_is_drafted_but_never_below_what_preprocessing_needs(tmp_path):
    path = _large_photo(tmp_path / "big.jpg")
    whole = open_image(path)
    drafted = open_image(path, min_side=160)
    assert whole.size == (4000, 3000)
    # 1/4 keeps 750 px (>= 4 x 160; 1/8 would keep 375); the decoder's scales are 1/2, 1/4, 1/8.
    assert drafted.size == (1000, 750) and drafted.mode == "RGB"
    # The same picture, smaller: averaged down, the two agree closely.
    reference = np.asarray(whole.resize(drafted.size, Image.BOX), np.float32)
    assert np.abs(np.asarray(drafted, np.float32) - reference).mean() < 3
    assert open_image(path, min_side=1000).size == (4000, 3000)  # 4 x 1000 > 3000 / 2: decoded whole
    small = _large_photo(tmp_path / "small.jpg", 2000, 1500)  # 3 megapixels: decoded whole, always
    assert open_image(small, min_side=32).size == (2000, 1500)
    png = tmp_path / "big.png"
    whole.save(png)
    assert open_image(png, min_side=160).size == (4000, 3000)  # no draft for other formats


def test_drafted_jpeg_keeps_its_exif_rotation(tmp_path):
    path = _large_photo(tmp_path / "phone.jpg", orientation=6)  # rotate 90 degrees clockwise to display
    assert open_image(path, min_side=160).size == (750, 1000)


def test_predictor_on_a_drafted_jpeg_agrees_with_the_whole_decode(tmp_path):
    from classifier.predict import Predictor

    path = _large_photo(tmp_path / "big.jpg")
    predictor = Predictor("assets/models/cifar10-cnn")
    drafted = predictor.predict(path)
    whole = predictor.top_classes(predictor.probabilities(predictor.transform(open_image(path)).unsqueeze(0))[0])
    assert next(iter(drafted)) == next(iter(whole))
    assert max(abs(drafted[k] - whole[k]) for k in whole) < 0.05
