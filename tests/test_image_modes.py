"""
guided_diffusion.image_io.open_rgb: every PIL mode read as 8-bit RGB at its right scale (16-bit PNGs
by their high byte, not clipped to white), or refused naming the file and its mode; and the training
data loader (folders, zips, ImageDataset) and the ImageNet packer reading through it.
"""
import io
import os
import types
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.image_datasets import ImageDataset, load_data, load_source
from guided_diffusion.image_io import ImageModeError, open_rgb, to_rgb_image

LEVELS = np.array([[0, 1, 2, 3], [64, 100, 127, 128], [129, 200, 254, 255], [17, 34, 51, 68]], dtype=np.uint8)


def grey_rgb(levels):
    return np.repeat(np.asarray(levels, dtype=np.uint8)[..., None], 3, axis=-1)


def save(img, path, fmt, **kw):
    img.save(path, format=fmt, **kw)
    return path


def read(path):
    arr = np.asarray(open_rgb(str(path)))
    assert arr.dtype == np.uint8 and arr.shape[-1] == 3
    return arr


def uint16_image(values, mode):
    """A 16-bit image of ``values`` (uint16) in ``mode`` (I;16, I;16B, I;16L, I;16N)."""
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    return Image.frombytes(mode, values.shape[::-1], np.asarray(values, dtype=dtype).tobytes())


# --------------------------------------------------------------------------- 16-bit integer modes

# 257 k is level k exactly; the others show the rule (the high byte): 256 -> 1, 255 -> 0, 65535 -> 255
WORDS = np.array([[0, 257, 514, 771], [257 * 64, 257 * 100, 257 * 127, 257 * 128],
                  [257 * 129, 257 * 200, 257 * 254, 65535], [255, 256, 65280, 65534]], dtype=np.uint16)
WORD_LEVELS = np.array([[0, 1, 2, 3], [64, 100, 127, 128], [129, 200, 254, 255], [0, 1, 255, 255]], dtype=np.uint8)


def test_i16_png_is_read_at_16_bit_scale_not_white(tmp_path):
    path = save(uint16_image(WORDS, "I;16"), tmp_path / "g16.png", "PNG")
    with Image.open(path) as img:
        assert img.mode == "I;16"  # what Pillow opens a 16-bit greyscale PNG as
    np.testing.assert_array_equal(read(path), grey_rgb(WORD_LEVELS))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_i16_tiff_modes(tmp_path, mode):
    path = save(uint16_image(WORDS, mode), tmp_path / "g.tif", "TIFF")
    with Image.open(path) as img:
        assert img.mode == mode
    np.testing.assert_array_equal(read(path), grey_rgb(WORD_LEVELS))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_i16_modes_in_memory(mode):
    """I;16L and I;16N cannot be written to a file (PNG/TIFF store them as I;16): read as images."""
    img = uint16_image(WORDS, mode)
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "mem")), grey_rgb(WORD_LEVELS))


# --------------------------------------------------------------------------- 32-bit integer I


def test_i_from_a_16_bit_pgm_is_read_at_16_bit_scale(tmp_path):
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5 4 4 65535\n" + WORDS.astype(">u2").tobytes())
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(read(path), grey_rgb(WORD_LEVELS))
    # maxval 1023: Pillow rescales to 0..65535 (512 -> 32800 -> 128)
    path.write_bytes(b"P5 3 1 1023\n" + np.array([0, 512, 1023], ">u2").tobytes())
    np.testing.assert_array_equal(read(path), grey_rgb([[0, 128, 255]]))


def test_i_of_a_png_or_of_unsigned_16_bit_samples_is_16_bit():
    """Older Pillow opened 16-bit greyscale PNGs as mode I (raw mode I;16B)."""
    img = Image.fromarray(WORDS.astype(np.int32), "I")
    want = grey_rgb(WORD_LEVELS)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "a.png", file_format="PNG")), want)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "a.png", rawmode="I;16B")), want)


@pytest.mark.parametrize("values,observed", [([[0, 70000]], "0..70000"), ([[0, 255]], "0..255"),
                                             ([[-5, 100]], "-5..100")])
def test_i_tiff_of_32_bit_samples_is_refused_with_its_range(tmp_path, values, observed):
    path = save(Image.fromarray(np.array(values, np.int32), "I"), tmp_path / "deep.tif", "TIFF")
    with pytest.raises(ImageModeError) as e:
        read(path)
    msg = str(e.value)
    assert str(path) in msg and "'I'" in msg and observed in msg and "ambiguous" in msg


def test_i_of_a_png_outside_16_bits_is_refused():
    img = Image.fromarray(np.array([[0, 70000]], np.int32), "I")
    with pytest.raises(ImageModeError, match=r"a\.png: .*mode 'I'.*0\.\.70000 outside 0\.\.65535"):
        to_rgb_image(img, "a.png", file_format="PNG")


# --------------------------------------------------------------------------- float F


@pytest.mark.parametrize("values,levels", [
    ([[0.0, 0.5, 1.0, 0.25]], [[0, 128, 255, 64]]),  # [0, 1]: times 255, rounded
    ([[0.0, 100.4, 255.0, 17.6]], [[0, 100, 255, 18]]),  # [0, 255]: as they are, rounded
])
def test_f_tiff_in_unit_or_byte_range(tmp_path, values, levels):
    path = save(Image.fromarray(np.array(values, np.float32), "F"), tmp_path / "f.tif", "TIFF")
    with Image.open(path) as img:
        assert img.mode == "F"
    np.testing.assert_array_equal(read(path), grey_rgb(levels))


@pytest.mark.parametrize("values,observed", [([[-1.0, 0.5, 1.0]], "values -1..1"),
                                             ([[0.0, 300.0, 2.0]], "values 0..300"),
                                             ([[0.0, np.nan, 1.0]], "non-finite values")])
def test_f_outside_the_known_ranges_is_refused_with_its_range(tmp_path, values, observed):
    path = save(Image.fromarray(np.array(values, np.float32), "F"), tmp_path / "f.tif", "TIFF")
    with pytest.raises(ImageModeError) as e:
        read(path)
    msg = str(e.value)
    assert str(path) in msg and "mode 'F'" in msg and observed in msg


# --------------------------------------------------------------------------- 8-bit modes


def test_mode_1_png(tmp_path):
    bits = (LEVELS > 100)
    path = save(Image.fromarray(bits), tmp_path / "b.png", "PNG")
    with Image.open(path) as img:
        assert img.mode == "1"
    np.testing.assert_array_equal(read(path), grey_rgb(np.where(bits, 255, 0)))


def test_mode_l_png(tmp_path):
    path = save(Image.fromarray(LEVELS, "L"), tmp_path / "l.png", "PNG")
    np.testing.assert_array_equal(read(path), grey_rgb(LEVELS))


def test_mode_la_png_drops_alpha(tmp_path):
    alpha = np.array([[0, 255, 128, 1]] * 4, np.uint8)
    path = save(Image.fromarray(np.stack([LEVELS, alpha], -1), "LA"), tmp_path / "la.png", "PNG")
    with Image.open(path) as img:
        assert img.mode == "LA"
    np.testing.assert_array_equal(read(path), grey_rgb(LEVELS))  # the stored grey, transparent pixels too


def test_mode_la_premultiplied_is_unpremultiplied():
    img = Image.fromarray(np.array([[[200, 128], [50, 255]]], np.uint8), "LA").convert("La")
    assert img.mode == "La"
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "mem")), grey_rgb([[199, 50]]))


COLOURS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]],
                    [[0, 0, 0], [255, 255, 255], [128, 64, 32], [1, 2, 3]]], np.uint8)


def test_mode_rgb_png(tmp_path):
    path = save(Image.fromarray(COLOURS), tmp_path / "c.png", "PNG")
    np.testing.assert_array_equal(read(path), COLOURS)


def test_mode_rgb_16_bit_png_by_pillow(tmp_path):
    """A 16-bit RGB PNG opens as RGB (Pillow keeps the high byte): the rule the grey modes follow."""
    import zlib
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    words = (COLOURS[:1].astype(np.uint16) << 8) | np.array([0, 1, 255], np.uint16)  # low bytes ignored
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in words)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    np.testing.assert_array_equal(read(path), COLOURS[:1])


def test_mode_rgba_png_drops_alpha(tmp_path):
    alpha = np.array([[0, 255, 128, 7], [255, 0, 0, 255]], np.uint8)[..., None]
    path = save(Image.fromarray(np.concatenate([COLOURS, alpha], -1), "RGBA"), tmp_path / "a.png", "PNG")
    np.testing.assert_array_equal(read(path), COLOURS)  # as upstream's convert("RGB"): stored colours


def test_mode_rgba_premultiplied_is_unpremultiplied():
    img = Image.fromarray(np.array([[[200, 100, 50, 128], [10, 20, 30, 255]]], np.uint8), "RGBA").convert("RGBa")
    assert img.mode == "RGBa"
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "mem")), [[[199, 99, 49], [10, 20, 30]]])


def test_mode_rgbx():
    img = Image.fromarray(COLOURS).convert("RGBX")
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "mem")), COLOURS)


def palette_image():
    img = Image.new("P", (4, 2))
    img.putpalette(COLOURS.reshape(-1).tolist())
    img.putdata(list(range(8)))
    return img


@pytest.mark.parametrize("transparency", [None, 3, bytes([255, 0, 128, 0, 255, 255, 255, 0])])
def test_mode_p_png_with_and_without_transparency(tmp_path, transparency):
    img = palette_image()
    if transparency is not None:
        img.info["transparency"] = transparency
    path = save(img, tmp_path / "p.png", "PNG")
    with Image.open(path) as opened:
        assert opened.mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency expressed in bytes" warning
        np.testing.assert_array_equal(read(path), COLOURS)  # palette colours, transparency dropped


def test_mode_p_gif(tmp_path):
    path = save(palette_image(), tmp_path / "p.gif", "GIF")
    np.testing.assert_array_equal(read(path), COLOURS)


def test_mode_pa_tiff_drops_alpha(tmp_path):
    img = palette_image().convert("PA")
    path = save(img, tmp_path / "pa.tif", "TIFF")
    with Image.open(path) as opened:
        assert opened.mode == "PA"
    np.testing.assert_array_equal(read(path), COLOURS)


def test_mode_cmyk_tiff(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]]], np.uint8)
    path = save(Image.fromarray(cmyk, "CMYK"), tmp_path / "k.tif", "TIFF")
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
    np.testing.assert_array_equal(read(path), [[[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0],
                                                [0, 0, 0]]])


def test_mode_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "k.jpg", "JPEG", quality=100)
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
    arr = read(path).astype(int)
    assert np.abs(arr - [255, 0, 0]).max() <= 2  # red, within JPEG's rounding


def test_mode_ycbcr_tiff(tmp_path):
    img = Image.frombytes("YCbCr", (3, 1), bytes([0, 128, 128, 255, 128, 128, 128, 128, 128]))
    path = save(img, tmp_path / "y.tif", "TIFF")
    with Image.open(path) as opened:
        assert opened.mode == "YCbCr"
    np.testing.assert_array_equal(read(path), grey_rgb([[0, 255, 128]]))


def test_mode_lab_tiff(tmp_path):
    # black, white (a, b are signed bytes: 0 is neutral), and the LAB of red and of a blue
    lab = np.concatenate([[[[0, 0, 0], [255, 0, 0]]], np.asarray(Image.fromarray(COLOURS[:1, [0, 3]]).convert("LAB"))],
                         axis=1)
    path = save(Image.fromarray(lab.astype(np.uint8), "LAB"), tmp_path / "lab.tif", "TIFF")
    with Image.open(path) as opened:
        assert opened.mode == "LAB"
    got = read(path)
    np.testing.assert_array_equal(got, np.asarray(Image.fromarray(lab.astype(np.uint8), "LAB").convert("RGB")))
    want = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]]])
    assert np.abs(got.astype(int) - want).max() <= 6  # within 8-bit LAB's quantisation


def test_mode_hsv():
    img = Image.frombytes("HSV", (4, 1), bytes([0, 255, 255, 85, 255, 255, 170, 255, 255, 0, 0, 77]))
    np.testing.assert_array_equal(np.asarray(to_rgb_image(img, "mem")),
                                  [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [77, 77, 77]]])


def test_bytes_and_file_objects_are_named(tmp_path):
    data = io.BytesIO()
    uint16_image(WORDS, "I;16").save(data, format="PNG")
    np.testing.assert_array_equal(np.asarray(open_rgb(data.getvalue())), grey_rgb(WORD_LEVELS))
    bad = io.BytesIO()
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(bad, format="TIFF")
    with pytest.raises(ImageModeError, match=r"^member\.tif: .*'I'"):
        open_rgb(bad.getvalue(), "member.tif")
    with pytest.raises(ImageModeError, match=r"^<image bytes>: .*'I'"):
        open_rgb(bad.getvalue())


def test_unknown_mode_is_refused_naming_file_and_mode():
    fake = types.SimpleNamespace(mode="BGR;15", format=None)
    with pytest.raises(ImageModeError, match=r"^odd\.png: images of PIL mode 'BGR;15' are not supported"):
        to_rgb_image(fake, "odd.png")


def test_a_conversion_pil_cannot_do_is_refused_naming_file_and_mode():
    class NoConvert:
        mode, format = "HSV", None

        def convert(self, mode):
            raise ValueError(f"conversion from HSV to {mode} not supported")

    with pytest.raises(ImageModeError, match=r"^h\.tif: cannot convert its PIL mode 'HSV' image to RGB"):
        to_rgb_image(NoConvert(), "h.tif")


# --------------------------------------------------------------------------- the data loader


def gradient_words(size=8):
    """A 16-bit horizontal gradient whose levels are 257 k (k = 0, 36, ..., 252): level k exactly."""
    k = (np.arange(size) * 36).astype(np.uint16)
    return np.tile(k * 257, (size, 1)), np.tile(k.astype(np.uint8), (size, 1))


def test_loader_reads_an_i16_png_folder_and_zip_at_scale(tmp_path):
    words, levels = gradient_words()
    folder = tmp_path / "data"
    folder.mkdir()
    uint16_image(words, "I;16").save(folder / "g16.png")
    want = grey_rgb(levels)
    src = load_source(str(folder), 8)
    np.testing.assert_array_equal(src.images[0], want)
    assert (src.images == 255).mean() < 0.2  # not the all-white reading of issue 31
    x, _ = next(load_data(data_dir=str(folder), batch_size=1, image_size=8, deterministic=True,
                          random_flip=False))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want / 127.5 - 1, atol=1e-6)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        zf.write(folder / "g16.png", "train/g16.png")
    np.testing.assert_array_equal(load_source(str(tmp_path / "data.zip"), 8).images[0], want)
    item, _ = ImageDataset(8, [str(folder / "g16.png")], random_flip=False)[0]
    np.testing.assert_allclose(np.transpose(item, (1, 2, 0)), want / 127.5 - 1, atol=1e-6)


def test_loader_refuses_an_ambiguous_image_naming_it_even_when_skipping_corrupt_ones(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(LEVELS, "L").save(folder / "ok.png")
    # a float TIFF under a .png name (Pillow opens files by their content) with values -1..1
    Image.fromarray(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "F").save(folder / "neg.png",
                                                                                        format="TIFF")
    for skip in (True, False):
        with pytest.raises(ImageModeError) as e:
            load_source(str(folder), 4, skip_corrupt=skip)
        msg = str(e.value)
        assert os.path.join(str(folder), "neg.png") in msg and "mode 'F'" in msg and "-1..1" in msg


def test_imagenet_packer_reads_i16_and_refuses_ambiguous_images(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    name = "dataset_script_imagenet"  # the name tests/test_dataset_scripts.py imports it under
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parents[1] / "scripts" / "datasets" / "imagenet.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    imagenet = sys.modules[name]
    words, levels = gradient_words()
    train = tmp_path / "train" / "n01440764"
    train.mkdir(parents=True)
    uint16_image(words, "I;16").save(train / "n01440764_0.png")
    out = tmp_path / "packed"
    imagenet.pack_shards(str(tmp_path / "train"), str(out), image_size=8, shard_size=4)
    np.testing.assert_array_equal(load_source(str(out), 8).images[0], grey_rgb(levels))
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(train / "n01440764_1.png", format="TIFF")
    with pytest.raises(ImageModeError, match=r"n01440764_1\.png: .*'I'.*0\.\.70000"):
        imagenet.pack_shards(str(tmp_path / "train"), str(tmp_path / "p2"), image_size=8, shard_size=4)
    assert not (tmp_path / "p2.partial").exists() and not (tmp_path / "p2").exists()
