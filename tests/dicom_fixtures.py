"""Small DICOM files written with pydicom for the imaging and conversion tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path, stored: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 16, signed: bool = False, raw: bytes | None = None,
                j2k: bool = False, **attrs) -> str:
    """A CR DICOM whose PixelData is ``stored`` (16-bit allocated) or ``raw`` bytes verbatim.

    ``stored`` may be [H, W] or [F, H, W] (then NumberOfFrames = F). Extra header attributes
    (PatientName, RescaleSlope, WindowCenter, ...) are given as keywords. ``j2k=True`` stores
    a 2-D ``stored`` as lossless JPEG 2000 (``j2k_codestream``) whatever ``bits_stored`` says.
    """
    stored = np.asarray(stored)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    sop = attrs.pop("SOPInstanceUID", None) or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, sop
    ds.Modality = "CR"
    ds.PatientID = attrs.pop("PatientID", "P0")
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", None) or generate_uid()
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for k, v in attrs.items():
        setattr(ds, k, v)
    if j2k:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([j2k_codestream(stored, signed)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        if raw is None:
            raw = stored.astype("<i2" if signed else "<u2").tobytes()
        ds.PixelData = raw
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def j2k_codestream(values: np.ndarray, signed: bool = False) -> bytes:
    """Lossless 16-bit-precision JPEG 2000 codestream of int [H, W] ``values`` (Pillow/OpenJPEG).

    Pillow encodes unsigned data only. A signed codestream is the unsigned one of
    ``values + 32768`` with the sign bit of the SIZ component depth set: reversible coding
    DC-shifts unsigned samples by -2^15 and signed ones not at all, so the decoder yields
    ``values`` exactly.
    """
    values = np.asarray(values, np.int64)
    unsigned = values + (1 << 15) if signed else values
    buf = io.BytesIO()
    Image.fromarray(unsigned.astype(np.uint16)).save(buf, format="JPEG2000", no_jp2=True,
                                                     irreversible=False)
    data = bytearray(buf.getvalue())
    if signed:
        siz = data.index(b"\xff\x51")
        ssiz = siz + 40  # marker, Lsiz, Rsiz, 8 x 4-byte sizes, Csiz, then Ssiz of component 0
        assert data[ssiz] == 15, "expected a 16-bit unsigned component"
        data[ssiz] = 0x80 | 15
    return bytes(data)
