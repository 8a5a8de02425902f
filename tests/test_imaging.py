"""Every input format becomes one 8-bit gray array; broken files fail with their name."""

import numpy as np
import pytest
from PIL import Image

from fedxr.imaging import ImageReadError, load_for_model, read_gray, resize_square

from helpers import GRADIENT, SHARED_NIH, needs_shared, write_dicom

def test_8bit_gray_png(tmp_path):
    Image.fromarray(GRADIENT).save(tmp_path / "a.png")
    out = read_gray(tmp_path / "a.png")
    assert out.dtype == np.uint8
    assert out.shape == (40, 48)
    np.testing.assert_array_equal(out, GRADIENT)


def test_16bit_png_12bit_and_full_range(tmp_path):
    twelve = (GRADIENT.astype(np.uint16) * 16)  # max 4080: 12-bit detector data
    Image.fromarray(twelve).save(tmp_path / "b.png")
    out = read_gray(tmp_path / "b.png")
    assert out.dtype == np.uint8
    assert abs(int(out.max()) - 254) <= 1
    assert out.min() == 0
    full = GRADIENT.astype(np.uint16) * 257
    Image.fromarray(full).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_gray(tmp_path / "c.png"), GRADIENT, atol=1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes(tmp_path, mode):
    Image.fromarray(GRADIENT).convert(mode).save(tmp_path / "x.png")
    out = read_gray(tmp_path / "x.png")
    assert out.shape == GRADIENT.shape
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out.astype(int), GRADIENT.astype(int), atol=2)


def test_jpeg(tmp_path):
    Image.fromarray(GRADIENT).save(tmp_path / "x.jpg", quality=95)
    np.testing.assert_allclose(read_gray(tmp_path / "x.jpg").astype(int), GRADIENT.astype(int), atol=6)


def test_dicom_monochrome2_rescale(tmp_path):
    raw = (GRADIENT.astype(np.uint16) * 16)
    write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-100.0)
    out = read_gray(tmp_path / "a.dcm")
    assert out.dtype == np.uint8
    assert out[:, 0].max() == 0
    assert out[:, -1].min() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # a rising ramp stays rising


def test_dicom_monochrome1_is_inverted_and_windowed(tmp_path):
    raw = (GRADIENT.astype(np.uint16) * 16)
    write_dicom(tmp_path / "m1", raw, photometric="MONOCHROME1", window=(2000, 1000))  # no suffix: detected by DICM
    out = read_gray(tmp_path / "m1")
    # MONOCHROME1: high values are dark, so the ramp falls; the window saturates both ends.
    assert out[0, 0] == 255
    assert out[0, -1] == 0
    assert (out[0] == 255).sum() > 5
    assert (out[0] == 0).sum() > 5


def test_corrupt_and_empty_files_name_the_file(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray(GRADIENT).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="truncated.png: corrupt"):
        read_gray(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png: file is empty"):
        read_gray(empty)
    with pytest.raises(ImageReadError, match="gone.png: file not found"):
        read_gray(tmp_path / "gone.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    with pytest.raises(ImageReadError, match="bad.dcm: not a readable DICOM"):
        read_gray(tmp_path / "bad.dcm")


@needs_shared
def test_real_nih_image():
    img = read_gray(SHARED_NIH / "00000001_000.png")
    assert img.shape == (512, 512)
    assert img.dtype == np.uint8
    assert img.std() > 20
    small = load_for_model(SHARED_NIH / "00000001_000.png", 64)
    assert small.shape == (64, 64)
    assert abs(float(small.mean()) - float(img.mean())) < 3  # antialiased resize keeps brightness


def test_resize_square_identity_and_shape():
    square = GRADIENT[:40, :40]
    assert resize_square(square, 40) is square  # already the right size: untouched
    small = resize_square(GRADIENT, 32)
    assert small.shape == (32, 32)
    assert small.dtype == np.uint8
    assert small[:, 0].mean() < small[:, -1].mean()  # the ramp survives the resize


@pytest.mark.parametrize("kind", ["plain", "window", "monochrome1", "negative-slope", "signed", "signed-full-range",
                                  "voi-lut-sequence"])
def test_dicom_value_table_equals_per_pixel_pydicom(tmp_path, kind):
    """Integer DICOMs are mapped through a table of every stored value; the result must be exactly what
    pydicom's modality and VOI LUTs give applied to every pixel, then scaled over the image's range."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(2000, 600, (64, 80)), 0, 4095).astype(np.uint16)
    options = {"plain": {}, "window": {"window": (1500, 800)},
               "monochrome1": {"photometric": "MONOCHROME1", "window": (2000, 1000)},
               "negative-slope": {"slope": -2.0, "intercept": 10.0, "window": (-3000, 2000)},
               "signed": {"intercept": -1024.0, "window": (40, 400)}, "signed-full-range": {},
               "voi-lut-sequence": {}}[kind]
    path = write_dicom(tmp_path / "x.dcm", pixels, **options)
    if kind.startswith("signed"):  # CT-like signed data: PixelRepresentation 1, 16 bits stored
        ds = pydicom.dcmread(path)
        low, high = (-1024, 3000) if kind == "signed" else (-32768, 32767)
        signed = rng.integers(low, high, pixels.shape, endpoint=True).astype(np.int16)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.PixelData = 1, 16, 15, signed.tobytes()
        ds.save_as(path)
    if kind == "voi-lut-sequence":  # a non-monotonic VOI LUT: the display range is that of the values present
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        ds = pydicom.dcmread(path)
        item = Dataset()
        item.add_new(0x00283002, "US", [4096, 0, 16])                                   # LUTDescriptor
        item.add_new(0x00283006, "US", [(v * 7919) % 65536 for v in range(4096)])      # LUTData
        ds.VOILUTSequence = Sequence([item])
        ds.save_as(path)
    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds)
    if "VOILUTSequence" in ds:  # indexed by the integer modality values
        arr = apply_voi_lut(arr.astype(np.int64), ds, index=0)
    elif "WindowCenter" in ds:
        arr = apply_voi_lut(arr.astype(np.float32), ds, index=0)
    arr = arr.astype(np.float32)
    low, high = float(arr.min()), float(arr.max())
    expected = np.clip(np.rint((arr - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    if options.get("photometric") == "MONOCHROME1":
        expected = 255 - expected
    assert np.array_equal(read_gray(path), expected)


def test_dicom_with_a_broken_window_names_the_file(tmp_path):
    pixels = np.full((8, 8), 100, np.uint16)
    path = write_dicom(tmp_path / "broken.dcm", pixels, window=(100, 0))  # a window width of 0 is invalid
    with pytest.raises(ImageReadError, match=r"broken\.dcm: .*Window"):
        read_gray(path)
