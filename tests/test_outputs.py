"""PNG outputs: bit depth, full value range and polarity, read back with an independent decoder
(PIL for the pixels, the PNG header bytes for the stored bit depth)."""
import numpy as np
import pytest
from PIL import Image

from cxr_rf import outputs


def _ihdr(path):
    """(bit depth, colour type) from the PNG's IHDR chunk, which must come first."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return raw[24], raw[25]


def test_16_bit_png_holds_every_level(tmp_path):
    # 65536 samples evenly over [-1, 1]: a lossless 16-bit writer must produce each of the
    # 65536 levels exactly once, in order (an 8-bit or rescaled writer cannot).
    x = np.linspace(-1.0, 1.0, 65536).reshape(256, 256)
    path = tmp_path / "ramp16.png"
    outputs.write_png(path, x[..., None], bits=16)      # a trailing channel is squeezed away
    assert _ihdr(path) == (16, 0)                         # 16-bit grayscale
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.size == (256, 256)
        px = np.asarray(im).astype(np.int64)
    np.testing.assert_array_equal(px.ravel(), np.arange(65536))
    # Back to [-1, 1]: within one level of the float input (the rounding is half a level).
    back = px / 65535 * 2 - 1
    assert np.abs(back - x).max() <= 1 / 65535


def test_8_bit_png_is_8_bit(tmp_path):
    x = np.linspace(-1.0, 1.0, 256 * 4).reshape(32, 32)
    path = tmp_path / "ramp8.png"
    outputs.write_png(path, x, bits=8)
    assert _ihdr(path) == (8, 0)
    with Image.open(path) as im:
        assert im.mode == "L"
        px = np.asarray(im).astype(np.int64)
    assert set(np.unique(px).tolist()) == set(range(256))
    assert np.abs(px / 255 * 2 - 1 - x).max() <= 1 / 255


@pytest.mark.parametrize("bits", [8, 16])
def test_polarity_black_is_minus_one_white_is_plus_one(tmp_path, bits):
    top = (1 << bits) - 1
    # Left to right: below range, -1, -0.5, 0, +0.5, +1, above range.
    x = np.array([[-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]] * 2)
    path = tmp_path / f"pol{bits}.png"
    outputs.write_png(path, x, bits=bits)
    with Image.open(path) as im:
        px = np.asarray(im).astype(np.int64)[0]
    # -1 (and below) is black 0, +1 (and above) is white max; midpoints in between, increasing.
    np.testing.assert_array_equal(px, [0, 0, round(top / 4), round(top / 2), round(3 * top / 4),
                                       top, top])


def test_bad_bit_depth_refused(tmp_path):
    with pytest.raises(ValueError, match="8 or 16"):
        outputs.write_png(tmp_path / "x.png", np.zeros((4, 4)), bits=12)


def test_grid_labels_are_wrapped_not_cut():
    """Every requested finding reaches the sheet: a long label wraps onto more lines (the
    text band grows) instead of being cut at the tile's width."""
    img = np.zeros((8, 8), np.float32)
    short = outputs.grid([img, img], ["Cardiomegaly | F 70y PA", "no finding | M 35y PA"])
    long = outputs.grid([img, img], ["Cardiomegaly, Pleural Effusion, Pneumothorax, Support "
                                     "Devices | F 70y PA", "no finding | M 35y PA"])
    assert short.size == (256, 128 + 24)              # two lines: findings, demographics
    assert long.size[1] > short.size[1] + 12          # wrapped over more lines
    band = np.asarray(long)[: long.size[1] - 128, :128]
    assert (band[-12:] > 0).any()                     # the last line is drawn
