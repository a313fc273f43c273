"""cxr_rf.data.imaging: DICOM LUTs and polarity, PNG/JPEG bit depths, pad/crop geometry, bad files."""
import io
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxr_rf.data import imaging
from cxr_rf.data.imaging import ImageError
from dicom_fixtures import write_dicom


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path, format="PNG") if mode else Image.fromarray(array).save(path)
    return str(path)


# ------------------------------------------------------------------ real pydicom files

def test_every_pydicom_test_file_decodes_or_rejects_with_a_reason():
    files = [f for f in get_testdata_files() if os.path.isfile(f) and imaging.is_dicom(f)]
    assert len(files) > 100
    decoded, reasons = {}, {}
    for f in files:
        try:
            img = imaging.read(f)
        except ImageError as e:  # any other exception type fails the test
            assert str(e) and "\n" not in str(e)
            reasons[os.path.basename(f)] = str(e)
            continue
        assert img.dtype == np.uint16 and img.ndim == 2
        decoded[os.path.basename(f)] = img
    # Uncompressed, big-endian, deflated, RLE and JPEG 2000 decode; JPEG-LS has no decoder here.
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "6154"):
        assert name in decoded, reasons.get(name)
    assert reasons["MR_small_jpeg_ls_lossless.dcm"].startswith("no decoder for transfer syntax JPEG-LS")
    assert "multi-frame" in reasons["rtdose.dcm"]
    assert "colour" in reasons["ExplVR_BigEnd.dcm"] and "colour" in reasons["SC_rgb_jpeg.dcm"]
    assert "no pixel data" in reasons["rtplan.dcm"]
    assert "pixel data could not be decoded" in reasons["MR_truncated.dcm"]
    # Losslessly compressed copies decode to the same pixels as the uncompressed original.
    for twin in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(decoded[twin], decoded["MR_small.dcm"]), twin


def test_monochrome1_cr_is_inverted():
    """The MONOCHROME1 CR files decode to the exact complement of the same data read as MONOCHROME2."""
    crs = [f for f in get_testdata_files() if os.path.basename(f) in ("6154", "6247", "6278")]
    assert len(crs) == 3
    for f in crs:
        ds = pydicom.dcmread(f)
        assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
        out = imaging.read(f)
        ds.PhotometricInterpretation = "MONOCHROME2"
        naive = imaging.dicom_pixels(ds)
        assert np.abs(out.astype(np.int64) + naive - 65535).max() <= 1
        assert out.std() > 0


def test_monochrome1_polarity_dense_is_bright(tmp_path):
    """A synthetic film: a dense disc stored with LOW values (MONOCHROME1) must come out bright."""
    yy, xx = np.mgrid[:32, :32]
    density = np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 64, 1.0, 0.2)  # disc = bone
    stored = np.rint(4095 * (1 - density)).astype(np.uint16)  # MONOCHROME1: dense = low
    out = imaging.read(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                                   bits_stored=12))
    assert out[16, 16] == 65535 and out[0, 0] == 0


# ------------------------------------------------------------------ DICOM LUT arithmetic

def test_signed_12bit_rescale_window_analytic(tmp_path):
    """BitsStored 12 signed with junk in the unused high bits, rescale, then a LINEAR window."""
    v = np.arange(-2048, 2048, 16, dtype=np.int64).reshape(16, 16)  # all 12-bit signed values
    junk = np.uint16(0xA000)  # bits 13 and 15 set: must be ignored
    raw = ((v & 0x0FFF).astype(np.uint16) | junk).astype("<u2").tobytes()
    slope, intercept, c, w = 2.0, -100.0, 300.0, 2001.0
    f = write_dicom(tmp_path / "s.dcm", v, bits_stored=12, signed=True, raw=raw,
                    RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=c, WindowWidth=w)
    m = slope * v + intercept
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR, normalised to [0, 1].
    y = np.clip((m - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    expected = np.rint(y * 65535)
    out = imaging.read(f)
    assert np.abs(out.astype(np.int64) - expected).max() <= 1
    assert out.min() == 0 and out.max() == 65535  # the window clips both ends


def test_no_window_is_min_max_after_rescale(tmp_path):
    v = np.arange(64, dtype=np.uint16).reshape(8, 8) * 10 + 100
    out = imaging.read(write_dicom(tmp_path / "n.dcm", v, bits_stored=10,
                                   RescaleSlope=3.0, RescaleIntercept=-7.0))
    expected = np.rint((v - 100.0) / (630.0) * 65535)
    assert np.array_equal(out, expected.astype(np.uint16))


def test_voi_lut_sequence_uses_the_lut_range(tmp_path):
    """A VOI LUT that declares 16 bits but spans 0..4080 is normalised by its real range."""
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    lut = (np.arange(256) ** 2 // 255 * 16).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    f = write_dicom(tmp_path / "l.dcm", v, bits_stored=8, VOILUTSequence=Sequence([item]))
    out = imaging.read(f)
    assert np.array_equal(out, np.rint(lut[v] / lut.max() * 65535).astype(np.uint16))


def _min_max(v):
    v = np.asarray(v, np.float64)
    return np.rint((v - v.min()) / (v.max() - v.min()) * 65535).astype(np.uint16)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg2000_values_beyond_bits_stored_are_kept(tmp_path, photometric):
    """VinDr-CXR: JPEG 2000 with BitsStored 12 whose decoded values use 16 bits are not wrapped."""
    v = np.arange(256, dtype=np.int64).reshape(16, 16) * 250 + 17  # 17..63767: needs 16 bits
    f = write_dicom(tmp_path / "v.dicom", v, photometric=photometric, bits_stored=12, j2k=True)
    ds = pydicom.dcmread(f)
    assert ds.file_meta.TransferSyntaxUID.is_encapsulated and ds.BitsStored == 12
    assert ds.pixel_array.max() > 4095  # the codestream really holds 16-bit values
    out = imaging.read(f)
    want = _min_max(v) if photometric == "MONOCHROME2" else 65535 - _min_max(v)
    assert np.array_equal(out, want)  # monotonic in the stored values, nothing wrapped


def test_jpeg2000_signed_beyond_bits_stored_kept_and_fitting_values_unchanged(tmp_path):
    wide = np.arange(-128, 128, dtype=np.int64).reshape(16, 16) * 200  # -25600..25400 > 12-bit signed
    out = imaging.read(write_dicom(tmp_path / "w.dcm", wide, bits_stored=12, signed=True, j2k=True))
    assert np.array_equal(out, _min_max(wide))
    # Values that fit BitsStored decode exactly as the uncompressed twin does.
    for signed, v in ((True, np.arange(-2048, 2048, 16).reshape(16, 16)),
                      (False, np.arange(0, 4096, 16).reshape(16, 16))):
        j2k = imaging.read(write_dicom(tmp_path / "j.dcm", v, bits_stored=12, signed=signed, j2k=True))
        native = imaging.read(write_dicom(tmp_path / "n.dcm", v, bits_stored=12, signed=signed))
        assert np.array_equal(j2k, native) and np.array_equal(j2k, _min_max(v)), signed


def test_native_overlay_bits_above_bits_stored_are_masked(tmp_path):
    """Uncompressed data with an embedded overlay plane in bit 12: the overlay never shows."""
    v = np.arange(256, dtype=np.uint16).reshape(16, 16) * 16  # 0..4080, 12 bits
    overlay = np.zeros((16, 16), bool)
    overlay[4:8, 2:14] = True  # a burned-in "text" box
    raw = (v | (overlay.astype(np.uint16) << 12)).astype("<u2").tobytes()
    f = write_dicom(tmp_path / "o.dcm", v, bits_stored=12, raw=raw)
    ds = pydicom.dcmread(f)
    ds.add_new(0x60000010, "US", 16)           # OverlayRows
    ds.add_new(0x60000011, "US", 16)           # OverlayColumns
    ds.add_new(0x60000040, "CS", "G")          # OverlayType
    ds.add_new(0x60000100, "US", 16)           # OverlayBitsAllocated: embedded in PixelData
    ds.add_new(0x60000102, "US", 12)           # OverlayBitPosition
    ds.save_as(f)
    assert np.frombuffer(pydicom.dcmread(f).PixelData, "<u2").max() > 4095  # the overlay is there
    assert np.array_equal(imaging.read(f), _min_max(v))


def test_stored_bits_rules():
    sb = imaging._stored_bits
    junk = np.array([[0xA000 | 5, 7]], np.uint16)
    assert sb(junk, 12, False).tolist() == [[5, 7]]                  # native: always masked
    assert sb(junk, 12, False, decoded=True).tolist() == [[0xA005, 7]]  # decoded: kept
    patterns = np.array([[0xFFF, 0x800, 1]], np.uint16)              # 12-bit two's complement
    assert sb(patterns, 12, True, decoded=True).tolist() == [[-1, -2048, 1]]
    extended = np.array([[-2048, 2047, 0]], np.int16)
    assert sb(extended, 12, True, decoded=True).tolist() == [[-2048, 2047, 0]]
    mixed = np.array([[-5, 3000]], np.int16)                         # sign-extended and > 2047
    assert sb(mixed, 12, True, decoded=True).tolist() == [[-5, 3000]]
    assert sb(np.array([[70000]], np.uint32), 0, False).tolist() == [[70000]]  # no BitsStored


def test_burned_in_annotation_is_rejected(tmp_path):
    f = write_dicom(tmp_path / "b.dcm", np.zeros((16, 16), np.uint16), BurnedInAnnotation="YES")
    with pytest.raises(ImageError, match="BurnedInAnnotation"):
        imaging.read(f)


# ------------------------------------------------------------------ PNG / JPEG

def test_png_16bit_exact_and_8bit_widened(tmp_path):
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (24, 20)).astype(np.uint16)
    assert np.array_equal(imaging.read(_png(tmp_path / "a.png", a16)), a16)
    a8 = rng.integers(0, 256, (24, 20)).astype(np.uint8)
    out = imaging.read(_png(tmp_path / "b.png", a8))
    assert out.dtype == np.uint16 and np.array_equal(out, a8.astype(np.uint16) * 257)
    assert imaging.read(_png(tmp_path / "w.png", np.full((9, 9), 255, np.uint8))).min() == 65535


def test_rgba_and_rgb_to_luminance(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    rgba = np.stack([gray, gray, gray, rng.integers(0, 256, (16, 16)).astype(np.uint8)], -1)
    assert np.array_equal(imaging.read(_png(tmp_path / "g.png", rgba)), gray.astype(np.uint16) * 257)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: luminance 0.299 * 200
    assert np.all(imaging.read(_png(tmp_path / "r.png", rgb)) == round(0.299 * 200 * 257))
    la = np.stack([gray, np.zeros_like(gray)], -1)  # alpha 0 everywhere is still dropped
    assert np.array_equal(imaging.read(_png(tmp_path / "la.png", la, "LA")), gray.astype(np.uint16) * 257)


def test_truncated_and_foreign_files_raise_image_error(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (64, 64)).astype(np.uint8)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        data = buf.getvalue()
        (tmp_path / f"t.{fmt}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match="could not be decoded"):
            imaging.read(tmp_path / f"t.{fmt}")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="not a recognised image"):
        imaging.read(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="not found"):
        imaging.read(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="implausible image shape"):
        imaging.read(_png(tmp_path / "thin.png", np.zeros((4, 100), np.uint8)))


# ------------------------------------------------------------------ geometry

def test_pad_and_crop_geometry():
    portrait = np.full((40, 20), 1000, np.uint16)  # H x W = 2:1
    padded = imaging.fit_square(portrait, 16, "pad")
    assert padded.shape == (16, 16) and padded.dtype == np.uint16
    assert np.all(padded[:, 4:12] == 1000) and not padded[:, :4].any() and not padded[:, 12:].any()
    assert np.all(imaging.fit_square(portrait, 16, "crop") == 1000)
    ramp = np.tile(np.arange(40, dtype=np.uint16) * 100, (20, 1))  # landscape, value = 100 * x
    cropped = imaging.fit_square(ramp, 16, "crop")  # 20x40 -> 16x32 -> centre 16 columns
    assert np.all(np.diff(cropped[8].astype(int)) > 0)
    assert abs(int(cropped[8, 0]) - 1000) <= 150 and abs(int(cropped[8, -1]) - 2900) <= 150
    padded = imaging.fit_square(ramp, 16, "pad")  # 20x40 -> 8x16 centred vertically
    assert not padded[:4].any() and not padded[12:].any() and padded[4:12].all()
    with pytest.raises(ValueError, match="fit must be"):
        imaging.fit_square(portrait, 16, "stretch")


def test_downsampling_is_anti_aliased():
    checker = ((np.indices((64, 64)).sum(0) % 2) * 60000).astype(np.uint16)  # 1-px checkerboard
    out = imaging.fit_square(checker, 16, "pad").astype(float)
    assert abs(out.mean() - 30000) < 300 and out.std() < 0.01 * 65535


def _tilted(h, w):
    """uint16 [h, w] brightening to the right (by 40000) and downwards (by 15000): no symmetry."""
    y, x = np.mgrid[:h, :w]
    return np.rint(5000 + 40000 * x / (w - 1) + 15000 * y / (h - 1)).astype(np.uint16)


def _rise(a):
    """(right half - left half, bottom half - top half) mean brightness of ``a``."""
    a = np.asarray(a, np.float64)
    h, w = a.shape
    return a[:, w - w // 2:].mean() - a[:, :w // 2].mean(), a[h - h // 2:].mean() - a[:h // 2].mean()


def _assert_upright(a, what):
    # A left-right mirror flips the sign of the first, an up-down one of the second, a
    # transpose swaps which is larger (the horizontal tilt is the stronger one everywhere).
    lr, tb = _rise(a)
    assert lr > 0 and tb > 0 and lr > tb, f"{what}: left-right rise {lr:.0f}, top-bottom rise {tb:.0f}"


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (37, 37)])
@pytest.mark.parametrize("fit", imaging.FITS)
def test_fit_keeps_orientation(shape, fit):
    out = imaging.fit_square(_tilted(*shape), 16, fit)
    rows, cols = np.nonzero(out)  # the film without pad's black borders (the film is >= 5000)
    _assert_upright(out[rows.min():rows.max() + 1, cols.min():cols.max() + 1], f"{fit} {shape}")


@pytest.mark.parametrize("stored,stage", [(32, 16), (16, 32)])
def test_pipeline_stage_resize_keeps_orientation(stored, stage):
    """The training pipeline's resize of a stored R x R record to a stage resolution."""
    from cxr_rf.data import pipeline, schema
    record = schema.Record(image=_tilted(stored, stored), findings=np.zeros(14, np.int8),
                           source="phantom", patient_id="p")
    x = pipeline.DecodeExample(stage).map(schema.to_example(record))["image"]
    assert x.shape == (stage, stage, 1)
    _assert_upright(x[..., 0], f"stage {stored} -> {stage}")


def test_records_and_files_share_one_decoder(tmp_path):
    """A record's PNG bytes decode exactly as the same PNG read from a file."""
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (12, 9)).astype(np.uint16)
    assert np.array_equal(imaging.decode_png(imaging.encode_png(a16)), a16)
    for name, arr in (("g16", a16), ("g8", rng.integers(0, 256, (12, 9)).astype(np.uint8)),
                      ("rgb", rng.integers(0, 256, (12, 9, 3)).astype(np.uint8))):
        path = _png(tmp_path / f"{name}.png", arr)
        with open(path, "rb") as f:
            assert np.array_equal(imaging.decode_png(f.read()), imaging.read_raster(path)), name


def test_burned_in_annotation_allowed_on_request_is_flagged(tmp_path):
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    f = write_dicom(tmp_path / "b.dcm", v, BurnedInAnnotation="YES")
    image, flags = imaging.decode(f, allow_burned_in=True)
    assert flags == (imaging.BURNED_IN,) and np.array_equal(image, _min_max(v))
    assert imaging.decode(write_dicom(tmp_path / "c.dcm", v), allow_burned_in=True)[1] == ()
    with pytest.raises(ImageError, match="BurnedInAnnotation"):
        imaging.decode(f)


def test_stretch_and_invert_options(tmp_path):
    """16-bit PNGs using part of the range are stretched on request, then optionally inverted."""
    v = np.random.default_rng(2).integers(300, 3000, (12, 10)).astype(np.uint16)
    f = _png(tmp_path / "p.png", v)
    assert np.array_equal(imaging.read(f), v)  # never stretched unless asked
    assert np.array_equal(imaging.read(f, stretch=True), _min_max(v))
    assert np.array_equal(imaging.read(f, stretch=True, invert=True), 65535 - _min_max(v))
    assert np.array_equal(imaging.read(f, invert=True), 65535 - v)
    flat = _png(tmp_path / "flat.png", np.full((9, 9), 1234, np.uint16))
    assert not imaging.read(flat, stretch=True).any()  # a flat image -> zeros, no division by 0
    out = imaging.load(f, 8, "pad", stretch=True)
    assert out.shape == (8, 8) and out.max() > 10 * int(v.max())  # stretched before resizing
