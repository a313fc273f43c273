"""Small DICOM files written with pydicom for the imaging and conversion tests."""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path, stored: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 16, signed: bool = False, raw: bytes | None = None,
                **attrs) -> str:
    """A CR DICOM whose PixelData is ``stored`` (16-bit allocated) or ``raw`` bytes verbatim.

    ``stored`` may be [H, W] or [F, H, W] (then NumberOfFrames = F). Extra header attributes
    (PatientName, RescaleSlope, WindowCenter, ...) are given as keywords.
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
    if raw is None:
        raw = stored.astype("<i2" if signed else "<u2").tobytes()
    ds.PixelData = raw
    ds.save_as(path, enforce_file_format=True)
    return str(path)
