"""Tiny copies of each corpus in its real on-disk layout, for tests/test_sources.py.

Each ``make_<source>(root)`` writes a fixture under ``root`` and returns the directory to pass
as ``--input``. Headers are the published ones; rows mix good entries with the bad ones a real
release contains. The expected outcome of every row is noted next to it.
"""
from __future__ import annotations

import csv
import gzip
import os

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_rf.conditioning import FINDINGS

SIZE = 8


def image(path: str, kind: str = "png8", seed: int = 0) -> str:
    """Write a SIZE x SIZE image: png8, png16 (values beyond 8 bits), rgba, jpeg or dicom."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "png16":
        Image.fromarray(rng.integers(256, 65536, (SIZE, SIZE)).astype(np.uint16)).save(path)
    elif kind == "dicom":
        dicom(path, rng.integers(0, 4096, (SIZE, SIZE)).astype(np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8))
        im = im.convert("RGBA") if kind == "rgba" else im
        im.save(path, format="JPEG" if kind == "jpeg" else "PNG")
    return path


def dicom(path: str, pixels: np.ndarray, sex: str = "F", age: str = "045Y") -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientSex, ds.PatientAge = "DX", sex, age
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_csv(path: str, header: list[str], rows: list[dict | list], gz: bool = False) -> str:
    """Rows as dicts (missing keys blank) or lists; gzipped if ``gz`` (path gets '.gz')."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = path + ".gz" if gz else path
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header] if isinstance(r, dict) else r)
    return path


def make_mimic(root: str) -> str:
    d = os.path.join(root, "mimic-cxr-jpg", "2.0.0")
    meta_h = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
              "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
              "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    meta = [  # (dicom, subject, study, view, date, image written?)
        ("d1", "10000032", "50414267", "PA", "21800506", True),    # A: item, train
        ("d2", "10000032", "50414267", "LATERAL", "21800506", True),  # A: item
        ("d3", "10000032", "53189527", "LL", "21820101", True),    # A: no label row, not in split.csv
        ("d4", "10000764", "57375967", "AP", "21500101", True),    # B: validation
        ("d5", "10000898", "50771383", "", "21900101", False),     # C: reject, image missing
        ("d6", "10000935", "51178377", "PA", "21700101", True),    # D: reject, label 2.0
        ("d7", "10000764", "58000000", "PA", "21500101", True),    # B: reject, listed as test
        ("d8", "11000011", "59000000", "AP", "", True),            # E: no MIMIC-IV rows
        # A: the rarer ViewPosition codes of the real table (items, the patient's split)
        ("d9", "10000032", "53189527", "AP AXIAL", "21820101", True),
        ("d10", "10000032", "53189527", "PA LLD", "21820101", True),
        ("d11", "10000032", "53189527", "XTABLE LATERAL", "21820101", True),
        ("d12", "10000032", "53189527", "LAO", "21820101", True),
        ("d13", "10000032", "53189527", "SWIMMERS", "21820101", True),
        ("d14", "10000032", "53189527", "AP RLD", "21820101", True),
    ]
    rows = []
    for dcm, sub, st, view, date, write in meta:
        rows.append({"dicom_id": dcm, "subject_id": sub, "study_id": st, "ViewPosition": view,
                     "StudyDate": date, "Rows": "8", "Columns": "8"})
        if write:
            image(os.path.join(d, "files", f"p{sub[:2]}", f"p{sub}", f"s{st}", dcm + ".jpg"), "jpeg")
    write_csv(os.path.join(d, "mimic-cxr-2.0.0-metadata.csv"), meta_h, rows, gz=True)
    lab_h = ["subject_id", "study_id"] + sorted(FINDINGS)
    write_csv(os.path.join(d, "mimic-cxr-2.0.0-chexpert.csv"), lab_h, [
        {"subject_id": "10000032", "study_id": "50414267", "Cardiomegaly": "1.0", "Edema": "-1.0",
         "Pleural Effusion": "0.0"},
        {"subject_id": "10000764", "study_id": "57375967", "No Finding": "1.0"},
        {"subject_id": "10000935", "study_id": "51178377", "Cardiomegaly": "2.0"},
        {"subject_id": "10000764", "study_id": "58000000", "Edema": "1.0"},
        {"subject_id": "11000011", "study_id": "59000000", "Support Devices": "1.0"},
    ], gz=True)
    write_csv(os.path.join(d, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], [
        ["d1", "50414267", "10000032", "train"], ["d2", "50414267", "10000032", "train"],
        ["d4", "57375967", "10000764", "validate"], ["d5", "50771383", "10000898", "test"],
        ["d6", "51178377", "10000935", "train"], ["d7", "58000000", "10000764", "test"],
        ["d8", "59000000", "11000011", "train"]], gz=True)
    hosp = os.path.join(d, "hosp")
    write_csv(os.path.join(hosp, "patients.csv"),
              ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
              [["10000032", "F", "60", "2180", "2014 - 2016", ""], ["10000764", "M", "45", "2150", "", ""],
               ["10000898", "F", "30", "2190", "", ""], ["10000935", "M", "70", "2170", "", ""]], gz=True)
    write_csv(os.path.join(hosp, "admissions.csv"), ["subject_id", "hadm_id", "admittime", "race"], [
        ["10000032", "1", "", "WHITE"], ["10000032", "2", "", "UNKNOWN"],
        ["10000032", "3", "", "WHITE - OTHER EUROPEAN"], ["10000764", "4", "", "BLACK/AFRICAN AMERICAN"],
        ["10000935", "5", "", "HISPANIC/LATINO - PUERTO RICAN"]], gz=True)
    rep = os.path.join(d, "mimic-cxr-reports", "files", "p10", "p10000032", "s50414267.txt")
    os.makedirs(os.path.dirname(rep))
    with open(rep, "w") as f:
        f.write("                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F"
                "\n \n FINDINGS: \n \n Enlarged heart.  Trace\n fluid.\n \n IMPRESSION: \n \n Cardiomegaly.\n")
    rep = os.path.join(d, "files", "p10", "p10000764", "s57375967.txt")
    with open(rep, "w") as f:
        f.write("No acute   cardiopulmonary process.\n")
    return d


CHEXPERT_H = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(FINDINGS)


def _chexpert_rows(p: str) -> tuple[list[dict], list[dict]]:
    """train.csv and valid.csv rows whose Path starts with the release folder ``p``."""
    train = [
        {"Path": p + "train/patient00001/study1/view1_frontal.jpg", "Sex": "Female", "Age": "68",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", "Support Devices": "1.0", "Pleural Effusion": "-1.0",
         "Cardiomegaly": "0.0"},                                      # item
        {"Path": p + "train/patient00001/study1/view2_lateral.jpg", "Sex": "Female", "Age": "68",
         "Frontal/Lateral": "Lateral", "No Finding": "1.0"},           # item, LATERAL
        {"Path": p + "train/patient00002/study2/view1_frontal.jpg", "Sex": "Male", "Age": "0",
         "Frontal/Lateral": "Frontal", "AP/PA": "PA"},                 # item, age 0 = unknown
        {"Path": p + "train/patient00003/study1/view1_frontal.jpg", "Sex": "Unknown", "Age": "40",
         "Frontal/Lateral": "Frontal", "AP/PA": "PA", "Cardiomegaly": "2.0"},  # reject: label
        {"Path": p + "train/patient00004/study1/view1_frontal.jpg", "Sex": "Male", "Age": "50",
         "Frontal/Lateral": "Frontal", "AP/PA": "PA"},                 # reject: no image
    ]
    valid = [
        {"Path": p + "valid/patient64541/study1/view1_frontal.jpg", "Sex": "Male", "Age": "73",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **{f: "0.0" for f in FINDINGS}, "Edema": "1.0"},
        {"Path": p + "valid/patient00002/study1/view1_frontal.jpg", "Sex": "Male", "Age": "40",
         "Frontal/Lateral": "Frontal", "AP/PA": "PA"},                 # reject: patient also in train
    ]
    return train, valid


CHEXPERT_PLUS_H = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
                   "section_findings", "section_impression", "age", "sex", "race"]
CHEXPERT_PLUS_ROWS = [
    {"path_to_image": "train/patient00001/study1/view1_frontal.jpg",
     "section_findings": "Lines and tubes\nin place.", "section_impression": "Possible effusion.",
     "race": "White, non-Hispanic"},
    {"path_to_image": "valid/patient64541/study1/view1_frontal.jpg",
     "section_impression": "Mild edema.", "race": "Black or African American"},
]


def make_chexpert(root: str) -> str:
    """The -small (Kaggle) copy: ``CheXpert-v1.0-small/{train.csv, valid.csv, train/, valid/}``."""
    d = os.path.join(root, "CheXpert-v1.0-small")
    train, valid = _chexpert_rows("CheXpert-v1.0-small/")
    write_csv(os.path.join(d, "train.csv"), CHEXPERT_H, train)
    write_csv(os.path.join(d, "valid.csv"), CHEXPERT_H, valid)
    for r in train[:4] + valid:
        image(os.path.join(root, r["Path"]), "jpeg")
    write_csv(os.path.join(d, "df_chexpert_plus_240401.csv"), CHEXPERT_PLUS_H, CHEXPERT_PLUS_ROWS)
    return d


CHEXPERT_BATCHES = {"patient00001": "CheXpert-v1.0 batch 2 (train 1)",
                    "patient00002": "CheXpert-v1.0 batch 3 (train 2)",
                    "patient00003": "CheXpert-v1.0 batch 3 (train 2)",
                    "patient00005": "CheXpert-v1.0 batch 4 (train 3)",
                    "patient00006": "CheXpert-v1.0 batch 4 (train 3)"}
CHEXPERT_BATCH1 = "CheXpert-v1.0 batch 1 (validate & csv)"  # assumed name (the reference names 2-4)


def make_chexpert_full(root: str, csv_at_root: bool = False) -> str:
    """The full Stanford AIMI release: training images in ``CheXpert-v1.0 batch N (train M)/patient.../``
    (no ``train/`` folder), validation images in ``valid/`` of batch 1; CSV Paths still read
    ``CheXpert-v1.0/train/...``. The CSVs sit in batch 1 (returned as the input), or with
    ``csv_at_root`` beside the batch folders (the root is the input). CheXpert-Plus lists three
    images no CSV row has: patient00005 (a JPEG in batch 4), patient00006 (only its PNG exists),
    patient00007 (missing), plus a row for a validation patient under train/ and an unparseable path.
    """
    d = os.path.join(root, "chexpertchestxrays-u20210408")
    train, valid = _chexpert_rows("CheXpert-v1.0/")
    csv_dir = d if csv_at_root else os.path.join(d, CHEXPERT_BATCH1)
    write_csv(os.path.join(csv_dir, "train.csv"), CHEXPERT_H, train)
    write_csv(os.path.join(csv_dir, "valid.csv"), CHEXPERT_H, valid)
    for r in train[:4]:
        patient, study, view = r["Path"].split("/")[2:]
        image(os.path.join(d, CHEXPERT_BATCHES[patient], patient, study, view), "jpeg")
    for r in valid:
        image(os.path.join(d, CHEXPERT_BATCH1, *r["Path"].split("/")[1:]), "jpeg")
    image(os.path.join(d, CHEXPERT_BATCHES["patient00005"], "patient00005/study1/view1_frontal.jpg"), "jpeg")
    image(os.path.join(d, CHEXPERT_BATCHES["patient00006"], "patient00006/study1/view1_frontal.png"), "png8")
    plus = CHEXPERT_PLUS_ROWS + [
        {"path_to_image": "train/patient00005/study1/view1_frontal.jpg", "frontal_lateral": "Frontal",
         "ap_pa": "PA", "age": "61", "sex": "Female", "section_impression": "Clear.", "race": "Asian"},
        {"path_to_image": "train/patient00006/study1/view1_frontal.jpg", "frontal_lateral": "Lateral",
         "age": "0", "sex": "Male"},
        {"path_to_image": "train/patient00007/study1/view1_frontal.jpg"},    # reject: no image
        {"path_to_image": "train/patient64541/study9/view1_frontal.jpg"},    # reject: validation patient
        {"path_to_image": "somewhere/else.jpg"},                             # reject: unparseable
    ]
    write_csv(os.path.join(csv_dir, "df_chexpert_plus_240401.csv"), CHEXPERT_PLUS_H, plus)
    return csv_dir


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_ROWS = [  # image, labels, follow-up, patient, age, sex, view; expected outcome
    ("00000001_000.png", "Cardiomegaly", "0", "1", "58", "M", "PA"),      # item train
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA"),  # item train
    ("00000001_002.png", "Effusion|Infiltration|Mass|Nodule|Pleural_Thickening", "2", "1", "058Y", "M",
     "AP"),                                                                  # item train
    ("00000002_000.png", "No Finding", "0", "2", "81", "M", "PA"),          # item train
    ("00000003_000.png", "Hernia", "0", "3", "412", "F", "PA"),             # item test, age typo
    ("00000004_000.png", "Foo", "0", "4", "50", "F", "PA"),                 # reject: unknown label
    ("00000005_000.png", "Pneumothorax", "0", "5", "30", "F", "AP"),        # reject: no image
    ("00000003_001.png", "Edema", "1", "3", "70", "F", "PA"),               # reject: patient 3 is test
    ("00000006_000.png", "Atelectasis", "0", "6", "33", "F", "PA"),         # reject: in both lists
    ("00000007_000.png", "Consolidation", "0", "7", "20", "M", "PA"),       # item, unlisted: None
]


def make_nih(root: str) -> str:
    d = os.path.join(root, "ChestXray-NIHCC")
    os.makedirs(d)
    with open(os.path.join(d, "Data_Entry_2017.csv"), "w") as f:
        f.write(NIH_HEADER + "\n")
        for r in NIH_ROWS:
            f.write(",".join(r) + ",2500,2048,0.143,0.143,\n")
    for i, r in enumerate(NIH_ROWS):
        if r[0] != "00000005_000.png":
            folder = "images_001" if i < 3 else "images_002"
            image(os.path.join(d, folder, "images", r[0]), "rgba" if i == 1 else "png8", i)
    with open(os.path.join(d, "train_val_list.txt"), "w") as f:
        f.write("\n".join(["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png",
                           "00000004_000.png", "00000003_001.png", "00000006_000.png"]) + "\n")
    with open(os.path.join(d, "test_list.txt"), "w") as f:
        f.write("00000003_000.png\n00000005_000.png\n00000006_000.png\n")
    return d


PADCHEST_H = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
              "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
              "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
              "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
              "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
              "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
              "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
              "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]
PADCHEST_ROWS = [  # image, dir, date, study, patient, birth, sex, projection, labels; outcome
    ("i1.png", "0", "20150405", "st1", "pa1", "1939.0", "M", "PA",
     "['pleural effusion', 'cardiomegaly', 'pacemaker']"),                 # item
    ("i2.png", "0", "20150405", "st1", "pa1", "1939.0", "M", "L", "['normal']"),  # item
    ("i3.png", "1", "20160101", "st2", "pa2", "", "F", "AP_horizontal",
     "[' nodule', '', 'aortic elongation']"),                              # item, age unknown
    ("i4.png", "1", "20160101", "st3", "pa3", "1950.0", "F", "COSTAL", "['rib fracture']"),  # item
    ("i5.png", "2", "20160101", "st4", "pa4", "1950.0", "F", "EXCLUDE", "['normal']"),  # reject
    ("i6.png", "2", "20160101", "st5", "pa5", "1950.0", "F", "PA", "['unterminated"),  # reject
    ("i7.png", "2", "20160101", "st6", "pa6", "1950.0", "F", "PA", "['normal']"),  # reject: no file
    ("i8.png", "2", "20170101", "st7", "pa7", "1960", "O", "UNK", ""),      # item, unlabelled
]


PADCHEST_MONOCHROME1 = ("i3.png",)  # rows whose PhotometricInterpretation_DICOM is MONOCHROME1


def padchest_png(path: str, seed: int) -> str:
    """A PadChest-like 16-bit PNG: 12-bit values (300..4095), i.e. only part of the 16-bit range."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(300, 4096, (SIZE, SIZE)).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    return path


def make_padchest(root: str, flat: bool = False) -> str:
    """The release: one folder per ImageDir, or (``flat``) every PNG in one folder, as mirrors ship it."""
    d = os.path.join(root, "PADCHEST")
    rows = []
    for n, (img, folder, date, st, pat, birth, sex, proj, labels) in enumerate(PADCHEST_ROWS):
        rows.append({"": str(n), "ImageID": img, "ImageDir": folder, "StudyDate_DICOM": date, "StudyID": st,
                     "PatientID": pat, "PatientBirth": birth, "PatientSex_DICOM": sex, "Projection": proj,
                     "Labels": labels, "BitsStored_DICOM": "12", "Report": " derrame  pleural ",
                     "PhotometricInterpretation_DICOM": "MONOCHROME1" if img in PADCHEST_MONOCHROME1
                     else "MONOCHROME2", "MethodLabel": "Physician"})
        if img != "i7.png":
            padchest_png(os.path.join(d, img) if flat else os.path.join(d, folder, img), n)
    write_csv(os.path.join(d, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"), PADCHEST_H, rows,
              gz=True)
    return d


VINDR_LABELS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
                "COPD", "Lung tumor", "Pneumonia", "Tuberculosis"]


def make_vindr(root: str) -> str:
    d = os.path.join(root, "vindr-cxr", "1.0.0")
    train_h = ["image_id", "rad_id"] + VINDR_LABELS + ["Other diseases", "No finding"]
    test_h = ["image_id"] + VINDR_LABELS + ["Other disease", "No finding"]

    def row(image_id, rad=None, **pos):
        r = {"image_id": image_id, **{k: "0" for k in VINDR_LABELS + ["Other diseases", "Other disease",
                                                                      "No finding"]}}
        r.update({k.replace("_", " "): v for k, v in pos.items()})
        return r | ({"rad_id": rad} if rad else {})
    train = [
        row("imgA", "R1", Cardiomegaly="1", Aortic_enlargement="1", Rib_fracture="1"),
        row("imgA", "R2", Cardiomegaly="1", Clavicle_fracture="1"),
        row("imgA", "R3", No_finding="1"),
        row("imgB", "R4", No_finding="1"), row("imgB", "R5", No_finding="1"), row("imgB", "R6", No_finding="1"),
        row("imgC", "R1", Edema="2"),                     # reject this row; imgC keeps 2 readers
        row("imgC", "R2", **{"Nodule/Mass": "1"}), row("imgC", "R3"),
        row("imgD", "R1"), row("imgD", "R2"), row("imgD", "R3"),  # reject: no DICOM
        # F: consolidation and cardiomegaly 2/3: their parents (Lung Opacity, Enlarged
        # Cardiomediastinum) were not ticked but stay unmentioned, not negative.
        row("imgF", "R1", Consolidation="1", Cardiomegaly="1"), row("imgF", "R2", Consolidation="1",
                                                                    Cardiomegaly="1"),
        row("imgF", "R3", No_finding="1"),
        # G: 2 of 3 say No finding, 1 pneumonia: No Finding uncertain; Consolidation and Lung
        # Opacity (parents of pneumonia) unmentioned.
        row("imgG", "R1", No_finding="1"), row("imgG", "R2", No_finding="1"), row("imgG", "R3", Pneumonia="1"),
    ]
    test = [row("imgE", Pneumothorax="1.0"), row("imgA")]  # imgA: reject, already in train
    write_csv(os.path.join(d, "annotations", "image_labels_train.csv"), train_h, train)
    write_csv(os.path.join(d, "annotations", "image_labels_test.csv"), test_h, test)
    for i, name in enumerate(["train/imgA", "train/imgB", "train/imgC", "test/imgA", "train/imgF",
                              "train/imgG"]):
        image(os.path.join(d, name + ".dicom"), "dicom", i)
    vindr_dicom(os.path.join(d, "test", "imgE.dicom"))
    return d


VINDR_VALUES = np.arange(SIZE * SIZE, dtype=np.int64).reshape(SIZE, SIZE) * 1000 + 500  # 500..63500


def vindr_dicom(path: str) -> None:
    """A VinDr-CXR file as released: JPEG 2000, MONOCHROME1, BitsStored 12, values using 16 bits."""
    from dicom_fixtures import write_dicom
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_dicom(path, VINDR_VALUES, photometric="MONOCHROME1", bits_stored=12, j2k=True,
                PatientID="", PatientSex="F", PatientAge="045Y", Modality="DX")


def make_brax(root: str) -> str:
    d = os.path.join(root, "brax", "1.1.0")
    h = ["DicomPath", "PngPath", "PatientID", "AccessionNumber", "PatientSex", "PatientAge", "ViewPosition",
         "Rows", "Columns", "Manufacturer"] + list(FINDINGS)
    rows = [
        {"DicomPath": "Anonymized_DICOMs/id_1/Study_1/Series_1/image-1.dcm", "PngPath": "images/id_1/Study_1/a.png",
         "PatientID": "id_1", "AccessionNumber": "acc1", "PatientSex": "M", "PatientAge": "058Y",
         "ViewPosition": "PA", "Cardiomegaly": "1.0", "Edema": "-1.0"},           # item, PNG
        {"PngPath": "images/id_1/Study_1/b.png", "PatientID": "id_1", "AccessionNumber": "acc1",
         "PatientSex": "M", "PatientAge": "85 or more", "ViewPosition": "L", "No Finding": "1.0"},  # item
        {"DicomPath": "Anonymized_DICOMs/id_2/Study_1/Series_1/image-1.dcm", "PngPath": "images/id_2/x.png",
         "PatientID": "id_2", "PatientSex": "O", "PatientAge": "20-29", "ViewPosition": "AP LLD"},  # item, DICOM
        {"PngPath": "images/id_3/a.png", "PatientID": "id_3", "PatientSex": "F", "PatientAge": "40",
         "ViewPosition": "PA", "Fracture": "yes"},                                # reject: label
        {"PngPath": "images/id_4/a.png", "DicomPath": "Anonymized_DICOMs/id_4/a.dcm", "PatientID": "id_4",
         "PatientSex": "F", "PatientAge": "40", "ViewPosition": "PA"},            # reject: no image
        {"PngPath": "images/id_5/a.png", "PatientID": "id_5", "AccessionNumber": "acc5", "PatientSex": "F",
         "PatientAge": "60", "ViewPosition": "PA", "Atelectasis": "1.0"},         # item, band 60-64
    ]
    write_csv(os.path.join(d, "master_spreadsheet_update.csv"), h, rows)
    for p in ("images/id_1/Study_1/a.png", "images/id_1/Study_1/b.png", "images/id_3/a.png", "images/id_5/a.png"):
        image(os.path.join(d, p), "png8")
    image(os.path.join(d, "Anonymized_DICOMs/id_2/Study_1/Series_1/image-1.dcm"), "dicom")
    return d


def _rex_path(pat: str, study: str, sop: str) -> str:
    return f"../deid_png/{pat}/A{pat}/studies/{study}/series/{study}.9/instances/{sop}.png"


REX_CSV_H = ["id", "PatientID", "PatientAge", "PatientSex", "StudyDate", "StudyInstanceUid",
             "InstitutionName", "Indication", "Comparison", "Findings", "Impression"]


def _rex_entry(pat: str, study: str, sops: list[str], views: list | None, **fields) -> dict:
    """One study of ``*_metadata_view_position.json``: study fields + parallel per-image lists."""
    entry = {"PatientID": pat, "StudyInstanceUid": study, **fields,
             "ImagePath": [_rex_path(pat, study, s) for s in sops]}
    if views is not None:
        entry["ImageViewPosition"] = views
    return entry


def make_rexgradient(root: str) -> str:
    """The real release: per-STUDY CSVs (no image path) + per-split view-position JSON of image lists."""
    import json
    d = os.path.join(root, "ReXGradient-160K")
    meta = os.path.join(d, "metadata")
    train = [  # study rows
        {"id": "GRDN1_AGRDN1_1.2.3", "PatientID": "GRDN1", "PatientSex": "M", "PatientAge": "014Y",
         "StudyInstanceUid": "1.2.3", "InstitutionName": "SiteA", "Findings": "Lungs clear.",
         "Impression": "Normal chest."},     # 3 images: PA, LATERAL, and a missing file (reject)
        {"id": "GRDN4_AGRDN4_4.4", "PatientID": "GRDN4", "PatientSex": "F", "PatientAge": "040Y",
         "StudyInstanceUid": "4.4"},         # reject: no JSON entry, so no image paths
    ]
    train_json = {
        "GRDN1_AGRDN1_1.2.3": _rex_entry("GRDN1", "1.2.3", ["1.2.3.1", "1.2.3.2", "1.2.3.3"],
                                         ["POSTERO_ANTERIOR", "LATERAL", "PA"], PatientSex="M"),
        # only in the JSON: study fields from the entry itself; view list null -> unknown
        "GRDN5_AGRDN5_5.5": _rex_entry("GRDN5", "5.5", ["5.5.1"], [None], PatientSex="F",
                                       PatientAge="030Y", Impression="Small effusion."),
        "GRDN6_AGRDN6_6.6": {"PatientID": "GRDN6", "ImagePath": "not a list"},   # reject
    }
    valid = [{"id": "GRDN2_AGRDN2_7.7", "PatientID": "GRDN2", "PatientSex": "F", "PatientAge": "070Y",
              "StudyInstanceUid": "7.7", "Impression": "Edema."}]
    valid_json = {"GRDN2_AGRDN2_7.7": _rex_entry("GRDN2", "7.7", ["7.7.1"], ["ANTERO_POSTERIOR"])}
    # test: no id column (joined on StudyInstanceUid), labelled, gzipped
    test = [{"PatientID": "GRDN3", "PatientSex": "F", "PatientAge": "", "StudyInstanceUid": "8.8",
             "Cardiomegaly": "1.0"},                                              # item, labelled
            {"PatientID": "GRDN1", "PatientSex": "M", "PatientAge": "015Y",
             "StudyInstanceUid": "9.9"}]                                          # reject: in train
    test_json = {"k1": _rex_entry("GRDN3", "8.8", ["8.8.1"], ["SUPINE"]),
                 "k2": _rex_entry("GRDN1", "9.9", ["9.9.1"], ["PA"])}
    write_csv(os.path.join(meta, "train_metadata.csv"), REX_CSV_H, train)
    write_csv(os.path.join(meta, "valid_metadata.csv"), REX_CSV_H, valid)
    write_csv(os.path.join(meta, "test_metadata.csv"), REX_CSV_H[1:] + list(FINDINGS), test, gz=True)
    for name, data in (("train", train_json), ("valid", valid_json), ("test", test_json)):
        with open(os.path.join(meta, f"{name}_metadata_view_position.json"), "w") as f:
            json.dump(data, f)
    for data in (train_json, valid_json, test_json):
        for entry in data.values():
            for rel in entry["ImagePath"] if isinstance(entry["ImagePath"], list) else ():
                if not rel.endswith("1.2.3.3.png"):
                    image(os.path.normpath(os.path.join(meta, rel)), "png8")
    return d


def _openi_xml(uid: str, mesh: str, images: list[str], findings: str = "", impression: str = "") -> str:
    imgs = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral'
                   f'</caption><panel type="single"><url>/hadoop/{i}.jpg</url></panel></parentImage>'
                   for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><meta type="rr"/><uId id="{uid}"/>'
            f'<pmcId id="1"/><docSource>CXR</docSource><MedlineCitation Owner="Indiana University">'
            f'<Article PubModel="Electronic"><Abstract>'
            f'<AbstractText Label="COMPARISON">None.</AbstractText>'
            f'<AbstractText Label="INDICATION">Cough.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f'</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH>{imgs}</eCitation>')


def make_openi(root: str) -> str:
    d = os.path.join(root, "openi")
    xml = os.path.join(d, "ecgen-radiology")
    os.makedirs(xml)
    docs = {
        "1.xml": _openi_xml("CXR1", "<major>normal</major>", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
                            "The heart is normal.", "Normal chest x-XXXX."),
        "2.xml": _openi_xml("CXR2", "<major>Cardiomegaly/borderline</major><major>Pleural Effusion/right/small"
                            "</major><major>Lung/hypoinflation</major><automatic>Catheters, Indwelling"
                            "</automatic><automatic>Thickening/pleura/apex</automatic>",
                            ["CXR2_1_IM-0652-1001", "CXR2_1_IM-0652-2001"], impression="Small effusion."),
        "3.xml": "<eCitation><uId id='CXR3'>",                         # reject: malformed
        # MeSH variants of the real automatic terms
        "4.xml": _openi_xml("CXR4", "<major>Pulmonary Congestion/mild</major><automatic>Pleural Effusions"
                            "</automatic><major>Infiltrates/lung/base</major>", ["CXR4_1_IM-2000-1001"]),
        "5.xml": _openi_xml("CXR5", "<major>Effusion/left</major><major>Pleural Thickening/right/apex</major>",
                            ["CXR5_2_IM-2001-2001"]),
        "10.xml": _openi_xml("CXR10", "<major>No Indexing</major>", []),  # skipped: no images
    }
    for name, text in docs.items():
        with open(os.path.join(xml, name), "w") as f:
            f.write(text)
    for img in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001", "CXR4_1_IM-2000-1001",
                "CXR5_2_IM-2001-2001"):
        image(os.path.join(d, "NLMCXR_png", img + ".png"), "png8")
    # Optional per-image view table derived from the NLMCXR DICOMs (uid, filename, projection).
    write_csv(os.path.join(d, "indiana_projections.csv"), ["uid", "filename", "projection"], [
        ["1", "1_IM-0001-4001.dcm.png", "Frontal"], ["1", "1_IM-0001-3001.dcm.png", "Lateral"],
        ["4", "4_IM-2000-1001.dcm.png", "Lateral"], ["9", "not-an-image-name", "Lateral"]])
    return d
