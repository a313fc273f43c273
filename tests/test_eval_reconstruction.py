"""The autoencoder reconstruction measurement (cxr_rf.evaluation.reconstruction) against
codecs whose answer is known: the identity keeps everything (PSNR inf, retention 1, residual
0, no measurement error); a 4× box blur keeps a diffuse finding (edema) but loses thin
structures (fracture lines, devices) first. And the command's bad inputs."""
import numpy as np
import pytest

from cxr_rf import cli, errors, evaluate
from cxr_rf.evaluation import reconstruction as rec


class Identity:
    batch_size = 4

    def encode(self, x):
        return x

    def decode(self, z):
        return z

    def __call__(self, x):
        return x


class Blur(Identity):
    """Encode = 4× box average, decode = nearest upsampling: an 'f4, 1 channel' codec."""

    def encode(self, x):
        b, r, _ = x.shape
        return x.reshape(b, r // 4, 4, r // 4, 4).mean(axis=(2, 4))

    def decode(self, z):
        return np.repeat(np.repeat(z, 4, axis=1), 4, axis=2).astype(np.float32)

    def __call__(self, x):
        return self.decode(self.encode(x))


FINDINGS = ("Edema", "Fracture", "Support Devices")


def test_identity_keeps_everything():
    r = rec.reconstruction(Identity(), 64, num=4, per_finding=3, findings=FINDINGS)
    assert r["psnr"]["mean"] == np.inf and r["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(v["mean"] == 0.0 for v in r["measures"].values() if v["n"])
    for f in FINDINGS:
        e = r["findings"][f]
        assert e["patients"] == 3
        assert e["retention"]["mean"] == pytest.approx(1.0)
        assert e["residual"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_blur_loses_thin_lines_before_diffuse_findings():
    r = rec.reconstruction(Blur(), 64, num=4, per_finding=4, findings=FINDINGS)
    f = {k: (e["retention"]["mean"], e["residual"]["mean"]) for k, e in r["findings"].items()}
    assert f["Edema"][0] > 0.7 and f["Fracture"][0] < 0.3     # measured: 0.84 and 0.08
    assert f["Support Devices"][1] > f["Edema"][1] + 0.2      # 0.80 vs 0.40
    assert 15 < r["psnr"]["mean"] < 40 and r["latent_shape"] == [16, 16]
    assert r["compression"] == 16.0


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(errors.UserError, match="unknown findings"):
        rec.reconstruction(Identity(), 32, num=2, findings=["Cardiomegally"])
    assert cli.call(evaluate, ["reconstruction"]) == 2
    assert "--autoencoder is required" in capsys.readouterr().err
    assert cli.call(evaluate, ["reconstruction", f"--autoencoder={tmp_path}"]) == 2
    assert "no config.json" in capsys.readouterr().err
