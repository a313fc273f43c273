"""Decode a radiograph file to uint16 grayscale (dense = bright) and fit it to R x R.

    load(path, resolution, fit="pad") -> uint16 [R, R]

* DICOM (pydicom): BitsStored / PixelRepresentation honoured (native data masked to BitsStored;
  data decoded from a compressed codestream masked only when its values fit BitsStored, since
  headers understate the codestream's precision, e.g. VinDr-CXR), Modality LUT (rescale or LUT),
  VOI LUT (sequence, else WindowCenter/Width, else min-max over the image), MONOCHROME1
  inverted, result spread over the full 0..65535 range. Files flagged BurnedInAnnotation
  YES are rejected (identifying text in the pixels) unless the caller passes
  ``allow_burned_in`` (public, already de-identified releases: ``decode`` then reports the
  flag "burned_in_annotation"); overlays are never drawn. Colour and multi-frame DICOMs are
  rejected: a chest radiograph is one grayscale frame, and picking a frame or a colour
  channel silently would hide a wrong file. Compressed transfer syntaxes without an installed
  decoder plugin are rejected with the syntax's name.
* PNG / JPEG (Pillow): 16-bit kept as is; 8-bit widened x257 (exact: 255 -> 65535); RGB(A)
  reduced to luminance with the alpha channel dropped. The same rules decode a file
  (``read_raster``) and a stored record's PNG bytes (``decode_png``, the inverse of
  ``encode_png``), so a dataset's pixels never depend on which path read them.
* Opt-in, per image (``read``/``decode``/``load`` keywords, set from an Item's fields):
  ``stretch`` min-max stretches the decoded values to 0..65535 (16-bit PNGs that use only
  part of the range: PadChest, BRAX), ``invert`` inverts afterwards (MONOCHROME1 images
  stored as PNG, where the file itself does not say so).
* ``fit_square``: aspect-preserving, anti-aliased (Lanczos) resize, then pad or crop to R x R;
  the only resizer, also used by the training pipeline to bring stored images to a stage's
  resolution.

Every failure an input file can cause surfaces as ``ImageError`` with a one-line reason, so
the converter can reject the file and go on.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from cxr_rf import errors

FITS = ("pad", "crop")
MIN_SIDE = 8          # smaller images are not radiographs (icons, thumbnails, broken headers)
MAX_ASPECT = 4.0      # a chest film is near-square; 1 x 1000 "images" are broken files
_DICOM_EXTS = (".dcm", ".dicom", ".dic")


class ImageError(errors.UserError):
    """An image file that cannot be used; the message is the one-line reject reason."""


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM extension or the 'DICM' magic at byte 128 (extension-less files)."""
    if os.fspath(path).lower().endswith(_DICOM_EXTS):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


BURNED_IN = "burned_in_annotation"  # the flag ``decode`` reports for an allowed burned-in DICOM


def decode(path: str | os.PathLike, *, stretch: bool = False, invert: bool = False,
           allow_burned_in: bool = False) -> tuple[np.ndarray, tuple[str, ...]]:
    """Any supported file -> (uint16 [H, W] at native size, dense = bright; flags).

    ``flags`` names what was let through on purpose: ``BURNED_IN`` for a DICOM flagged
    BurnedInAnnotation YES read with ``allow_burned_in``. ``stretch`` and ``invert``: see the
    module docstring.
    """
    flags: tuple[str, ...] = ()
    if is_dicom(path):
        ds = _dcmread(path)
        if _burned_in(ds) and allow_burned_in:
            flags = (BURNED_IN,)
        image = dicom_pixels(ds, allow_burned_in=allow_burned_in)
    else:
        image = read_raster(path)
    _check_shape(image)
    if stretch:
        image = stretch_range(image)
    if invert:
        image = np.uint16(65535) - image
    return image, flags


def read(path: str | os.PathLike, *, stretch: bool = False, invert: bool = False,
         allow_burned_in: bool = False) -> np.ndarray:
    """Any supported file -> uint16 [H, W] at native size, dense = bright (``decode`` without flags)."""
    return decode(path, stretch=stretch, invert=invert, allow_burned_in=allow_burned_in)[0]


def load(path: str | os.PathLike, resolution: int, fit: str = "pad", **options) -> np.ndarray:
    """Any supported file -> uint16 [resolution, resolution] (``read`` options, ``fit_square``)."""
    return fit_square(read(path, **options), resolution, fit)


def stretch_range(image: np.ndarray) -> np.ndarray:
    """uint16 [H, W] -> the same image min-max stretched to 0..65535 (a flat image -> zeros)."""
    lo, hi = int(image.min()), int(image.max())
    if hi == lo:
        return np.zeros_like(image, np.uint16)
    scaled = (image.astype(np.float64) - lo) * (65535.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)


def _check_shape(image: np.ndarray) -> None:
    h, w = image.shape
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        raise ImageError(f"implausible image shape {h}x{w} (need sides >= {MIN_SIDE}, "
                         f"aspect <= {MAX_ASPECT:g})")


# ---------------------------------------------------------------- PNG / JPEG

def read_raster(path: str | os.PathLike) -> np.ndarray:
    """PNG/JPEG/... file -> uint16 [H, W]; 16-bit kept, 8-bit x257, colour -> luminance."""
    return _decode_raster(path)


def decode_png(data: bytes) -> np.ndarray:
    """A stored record's PNG bytes -> uint16 [H, W], by the same rules as ``read_raster``."""
    return _decode_raster(io.BytesIO(data))


def encode_png(image: np.ndarray) -> bytes:
    """uint16 [H, W] -> lossless 16-bit grayscale PNG; ``decode_png`` gives back the same array."""
    image = np.asarray(image)
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"encode_png needs uint16 [H, W]; got dtype {image.dtype} shape {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def _decode_raster(src) -> np.ndarray:
    """A path or binary file object -> uint16 [H, W]; every failure is an ImageError."""
    try:
        with Image.open(src) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return _to_uint16(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image could not be decoded: {_one_line(e)}") from None


def _to_uint16(im: Image.Image) -> np.ndarray:
    if getattr(im, "n_frames", 1) > 1:
        raise ImageError(f"multi-frame image ({im.n_frames} frames)")
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":  # Pillow may open 16-bit grayscale PNG as 32-bit "I"
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError("32-bit integer image with values outside 0..65535")
        return arr.astype(np.uint16)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.getchannel(0).convert("L"), np.uint16) * np.uint16(257)
    if mode in ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        # Float luminance (ITU-R 601) before widening, so gray stored as RGB stays exact.
        rgb = np.asarray(im.convert("RGB"), np.float32)
        lum = rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(lum * 257.0), 0, 65535).astype(np.uint16)
    raise ImageError(f"unsupported image mode {mode!r}")


# ---------------------------------------------------------------- DICOM

def read_dicom(path: str | os.PathLike, *, allow_burned_in: bool = False) -> np.ndarray:
    """DICOM file -> uint16 [H, W] after Modality LUT, VOI LUT/window and MONOCHROME1 inversion."""
    return dicom_pixels(_dcmread(path), allow_burned_in=allow_burned_in)


def _burned_in(ds) -> bool:
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def _dcmread(path: str | os.PathLike):
    import pydicom  # imported here: PNG-only conversions never pay for it
    from pydicom.errors import InvalidDicomError
    try:
        with warnings.catch_warnings():  # pydicom warns about every non-conformant header
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError,
            AttributeError, IndexError, NotImplementedError) as e:
        raise ImageError(f"not a readable DICOM file: {_one_line(e)}") from None
    return ds


def dicom_pixels(ds, *, allow_burned_in: bool = False) -> np.ndarray:
    """A read pydicom Dataset -> uint16 [H, W], dense = bright, full 0..65535 range."""
    with warnings.catch_warnings():  # pydicom warns about every non-conformant value it meets
        warnings.simplefilter("ignore")
        return _dicom_pixels(ds, allow_burned_in)


def _dicom_pixels(ds, allow_burned_in: bool = False) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
    if "PixelData" not in ds:
        raise ImageError("no pixel data (not an image DICOM)" if "FloatPixelData" not in ds
                         else "float pixel data is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        found = (f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
                 f"SamplesPerPixel {samples})" if photometric or samples != 1
                 else "no PhotometricInterpretation in the header")
        raise ImageError(f"{found}: only MONOCHROME1/2 grayscale is supported")
    if _burned_in(ds) and not allow_burned_in:
        # Text burned into the pixels (names, dates) cannot be removed reliably: keep it out.
        raise ImageError("BurnedInAnnotation is YES: the pixels may carry identifying text")
    frames = _int(ds.get("NumberOfFrames", 1), 1)
    if frames != 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames); expected one radiograph")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageError(f"no decoder for transfer syntax {tsyntax.name} ({tsyntax}); "
                             "install pylibjpeg or gdcm to read it")
    bits = _int(ds.get("BitsStored"), 0)
    signed = _int(ds.get("PixelRepresentation"), 0) == 1
    try:
        raw = ds.pixel_array
    except Exception as e:  # decoders raise many types; each is a property of this file
        raise ImageError(f"pixel data could not be decoded: {_one_line(e)}") from None
    if raw.ndim != 2:
        raise ImageError(f"pixel array has shape {raw.shape}; expected one 2-D frame")
    encapsulated = bool(tsyntax is not None and tsyntax.is_encapsulated)
    pixels = _stored_bits(raw, bits, signed, decoded=encapsulated)
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
        if ds.get("VOILUTSequence"):  # preferred over a window, as pydicom does
            count, first = (int(x) for x in ds.VOILUTSequence[0].LUTDescriptor[:2])
            domain = np.arange(first, first + (count or 65536), dtype=np.int64)
            # A LUT maps integers; clipping to its domain first is what the standard says
            # out-of-range inputs get, and keeps pydicom's uint16 index arithmetic in range.
            values = np.clip(np.rint(values), domain[0], domain[-1]).astype(np.int64)
            values = np.asarray(apply_voi_lut(values, ds, index=0), np.float64)
            # Normalise by what the LUT actually spans, not its nominal bit depth (LUTs that
            # declare 16 bits and use 12 are common). A decreasing LUT stays decreasing.
            table = np.asarray(apply_voi_lut(domain, ds, index=0), np.float64)
            lo, hi = float(table.min()), float(table.max())
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            values = np.asarray(apply_voi_lut(values, ds, index=0), np.float64)
            # The window's output range depends on the header; the images of two extreme
            # inputs are exactly its ends, whatever the function (LINEAR, SIGMOID, ...).
            ends = np.asarray(apply_voi_lut(np.asarray([-1e15, 1e15]), ds, index=0), np.float64)
            lo, hi = float(ends.min()), float(ends.max())
        else:
            lo, hi = float(values.min()), float(values.max())
    except Exception as e:  # malformed LUT / window attributes
        raise ImageError(f"invalid Modality/VOI LUT attributes: {_one_line(e)}") from None
    if not np.all(np.isfinite(values)):
        raise ImageError("non-finite values after the Modality/VOI LUT")
    scaled = (values - lo) / (hi - lo) if hi != lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # MONOCHROME1 shows minimum values as white
        scaled = 1.0 - scaled
    return np.clip(np.rint(scaled * 65535.0), 0, 65535).astype(np.uint16)


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _stored_bits(raw: np.ndarray, bits_stored: int, signed: bool, decoded: bool = False) -> np.ndarray:
    """The pixel values BitsStored describes: low BitsStored bits, sign-extended when signed.

    Native (uncompressed) data: old files embed overlay planes (annotations, sometimes text)
    or junk in the unused high bits; masking drops them, and overlays in (60xx,3000) are never
    rendered. ``decoded`` data (an encapsulated transfer syntax: JPEG 2000, RLE, ...) carries
    no such bits: the codec returns values at its own precision, and a header BitsStored
    smaller than that precision is wrong, not a request to mask. VinDr-CXR ships JPEG 2000
    with BitsStored 10/12 and values up to 16 bits: masking would wrap bright pixels to dark.
    So decoded values are masked only where they all fit BitsStored, where it changes nothing
    but the sign extension: unsigned 0..2^b-1; signed either already sign-extended
    (-2^(b-1)..2^(b-1)-1) or all b-bit two's-complement patterns (0..2^b-1, then extended).
    Otherwise (e.g. a negative value next to one >= 2^(b-1)) the decoded values are kept.
    """
    arr = raw.astype(np.int64)
    width = raw.dtype.itemsize * 8
    if not 0 < bits_stored < width:
        return arr
    if decoded and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        half, full = 1 << (bits_stored - 1), 1 << bits_stored
        fits = (0 <= lo and hi < full) or (signed and -half <= lo and hi < half)
        if not fits:
            return arr  # the values use more bits than the header says: keep them all
    arr &= (1 << bits_stored) - 1
    if signed:
        arr = np.where(arr >= 1 << (bits_stored - 1), arr - (1 << bits_stored), arr)
    return arr


# ---------------------------------------------------------------- geometry

def fit_square(image: np.ndarray, resolution: int, fit: str = "pad") -> np.ndarray:
    """uint16 [H, W] -> uint16 [R, R], aspect preserved.

    "pad" (default) scales the longer side to R and centres the image on black: nothing is
    cut, so apices and costophrenic angles, where several findings live, stay in the frame.
    "crop" scales the shorter side to R and keeps the centre square (no borders, but the
    edges of a portrait film are lost). Resizing is Lanczos in float ("F" mode), which Pillow
    anti-aliases when downsampling. A square image is one Lanczos resample to R x R whatever
    the fit: both scale its whole extent to R, with nothing to pad or cut.
    """
    image = np.asarray(image)
    if image.dtype != np.uint16 or image.ndim != 2 or min(image.shape) == 0:
        raise ValueError(f"fit_square needs a non-empty uint16 [H, W]; got {image.dtype} {image.shape}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int; got {resolution!r}")
    r = int(resolution)
    h, w = image.shape
    scale = r / (max(h, w) if fit == "pad" else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if fit == "pad":
        nh, nw = min(nh, r), min(nw, r)
    else:
        nh, nw = max(nh, r), max(nw, r)
    resized = _resize(image, nh, nw)
    if fit == "crop":
        top, left = (nh - r) // 2, (nw - r) // 2
        return np.ascontiguousarray(resized[top:top + r, left:left + r])
    out = np.zeros((r, r), np.uint16)
    top, left = (r - nh) // 2, (r - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape == (h, w):
        return image
    resized = Image.fromarray(image.astype(np.float32)).resize((w, h), Image.Resampling.LANCZOS)
    # Lanczos overshoots at edges; clip back into the 16-bit range.
    return np.clip(np.rint(np.asarray(resized)), 0, 65535).astype(np.uint16)
