"""The evaluation report (cxr_rf.evaluation.report): built from real section results on small
sets, its Markdown links only files that exist and its HTML is self-contained (every image
inlined, nothing fetched)."""
import json
import re

import numpy as np

from cxr_rf import features, outputs
from cxr_rf import conditioning as cond
from cxr_rf.evaluation import fidelity, privacy, report
from cxr_rf.evaluation.sets import ArraySet


def _set(n, seed, name):
    rng = np.random.default_rng(seed)
    metas = []
    for i in range(n):
        f = np.full(len(cond.FINDINGS), cond.NEGATIVE, np.int8)
        f[2] = cond.POSITIVE if i % 2 else cond.NEGATIVE
        metas.append({"findings": f, "sex": "MF"[i % 2], "age": 30.0 + i, "race": "unknown",
                      "view": "PA", "source": "phantom", "patient_id": f"{name}{i}"})
    return ArraySet(rng.uniform(0.2, 0.8, (n, 8, 8)).astype(np.float32), metas, name=name)


def test_report_links_existing_files_and_inlines_every_image(tmp_path):
    real, fake, train = _set(40, 0, "real"), _set(40, 1, "fake"), _set(60, 2, "train")
    ex = features.Pixels(size=4)
    conditional = {"settings": {"num": 4}, "findings": {
        "Cardiomegaly": {"samples": {"auroc": 0.9, "ci95": [0.8, 1.0], "n_pos": 4, "n_neg": 4},
                         "real": {"auroc": 0.95, "ci95": [0.9, 1.0], "n_pos": 10, "n_neg": 30}},
        "Edema": {"samples": {"auroc": 0.5, "ci95": [0.3, 0.7], "n_pos": 4, "n_neg": 4},
                  "real": None}}}
    m = {"workdir": "runs/x", "checkpoint_step": 7, "reference": "data", "split": "test",
         "protocol": "default", "seed": 0, "timing_s": {"fidelity": 1.0},
         "sections": {
             "conditional": conditional,
             "fidelity": {"pixels4": fidelity.fidelity(real, fake, ex, workdir=tmp_path, n_boot=5,
                                                       min_count=10)},
             "privacy": {"samples": privacy.privacy(fake, train, real, {"pixels": ex},
                                                    workdir=tmp_path, out_dir=tmp_path / "privacy")},
         }}
    m["samples_png"] = report.samples_png(str(tmp_path / "plots" / "samples.png"), fake, real, n=4)
    (tmp_path / "metrics.json").write_text(json.dumps(outputs.to_json(m), allow_nan=False))
    report.write(m, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for head in ("## Conditional accuracy", "## Fidelity in pixels4 space", "## Privacy"):
        assert head in md
    assert "| Cardiomegaly | 0.90 [0.80, 1.00] | 0.95 [0.90, 1.00] | 10/30 |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 5 and all((tmp_path / p).is_file() for p in links)
    html = (tmp_path / "report.html").read_text()
    assert html.count("<img ") == len(links) == html.count('src="data:image/png;base64,')
    assert "http://" not in html and "https://" not in html
    assert "<code>runs/x</code>" in html
